// Hugging Face directories assembled tensor by tensor from another
// checkpoint, and Mixtral's per-expert tensors repacked in transformers 5's
// layout: what the HF reader's tests use to build layouts and break them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "moeforge/io/safetensors.hpp"
#include "support/util.hpp"

namespace moeforge::test {

// A Hugging Face directory from a config and tensors (every tensor copied from
// `source` unless `edit` replaces or drops it).
struct hf_dir_builder {
  std::vector<std::string> names;
  std::vector<std::vector<std::int64_t>> shapes;
  std::vector<std::vector<float>> data;

  explicit hf_dir_builder(const io::safetensors_checkpoint& source) {
    for (const auto& n : source.names()) put(n, source.info(n).shape, source.read(n));
  }
  void put(const std::string& name, std::vector<std::int64_t> shape, std::vector<float> values) {
    drop(name);
    names.push_back(name);
    shapes.push_back(std::move(shape));
    data.push_back(std::move(values));
  }
  void drop(const std::string& name) {
    for (std::size_t i = 0; i < names.size(); ++i)
      if (names[i] == name) {
        names.erase(names.begin() + std::ptrdiff_t(i));
        shapes.erase(shapes.begin() + std::ptrdiff_t(i));
        data.erase(data.begin() + std::ptrdiff_t(i));
        return;
      }
  }
  /// Replaces a tensor's values, keeping its shape.
  void set(const std::string& name, std::vector<float> values) {
    for (std::size_t i = 0; i < names.size(); ++i)
      if (names[i] == name) return void(data[i] = std::move(values));
    FAIL("no tensor " << name);
  }
  const std::vector<float>& get(const std::string& name) const {
    for (std::size_t i = 0; i < names.size(); ++i)
      if (names[i] == name) return data[i];
    FAIL("no tensor " << name);
    throw 0;
  }
  /// Writes the directory, every tensor stored as `stored` (F32, BF16 or F16).
  std::string write(const std::string& dir, const nlohmann::json& config, io::dtype stored = io::dtype::f32) const {
    std::filesystem::create_directories(dir);
    std::vector<io::tensor_info> infos;
    std::size_t end = 0;
    for (std::size_t i = 0; i < names.size(); ++i) {
      const std::size_t begin = end;
      end += data[i].size() * dtype_size(stored);
      infos.push_back({names[i], stored, shapes[i], begin, end});
    }
    io::safetensors_writer w(dir + "/model.safetensors", io::detail::header_text(infos, {{"format", "pt"}}).size());
    for (std::size_t i = 0; i < names.size(); ++i) w.add(names[i], shapes[i], data[i].data(), stored);
    w.finish();
    write_json(dir + "/config.json", config);
    return dir;
  }
};

// Mixtral's classic per-expert tensors rewritten as transformers-5 packed ones
// under "mlp": gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
inline void pack_mixtral(hf_dir_builder& b, index_t layers, index_t experts, index_t inter, index_t hidden) {
  for (index_t l = 0; l < layers; ++l) {
    const std::string old = "model.layers." + std::to_string(l) + ".block_sparse_moe.";
    const std::string neu = "model.layers." + std::to_string(l) + ".mlp.";
    std::vector<float> gate_up, down;
    for (index_t e = 0; e < experts; ++e) {
      const std::string p = old + "experts." + std::to_string(e) + ".";
      for (const char* w : {"w1", "w3"}) {
        const auto& v = b.get(p + w + ".weight");
        gate_up.insert(gate_up.end(), v.begin(), v.end());
      }
      const auto& d = b.get(p + "w2.weight");
      down.insert(down.end(), d.begin(), d.end());
      for (const char* w : {"w1", "w2", "w3"}) b.drop(p + w + ".weight");
    }
    b.put(neu + "experts.gate_up_proj", {experts, 2 * inter, hidden}, gate_up);
    b.put(neu + "experts.down_proj", {experts, hidden, inter}, down);
    b.put(neu + "gate.weight", {experts, hidden}, b.get(old + "gate.weight"));
    b.drop(old + "gate.weight");
  }
}

}  // namespace moeforge::test
