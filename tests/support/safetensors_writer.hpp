// Safetensors files written by the tests themselves, not by moeforge's writer,
// so that a checkpoint a test builds is independent of the code it checks.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/core/tensor.hpp"

namespace moeforge::test {

struct raw_tensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<float> values;
};

/// The 8-byte header length, the JSON header padded to 8 bytes, the values as `type`.
inline void write_tensors(const std::string& path, const std::vector<raw_tensor>& tensors, dtype type = dtype::f32) {
  nlohmann::json header;
  std::string data;
  for (const auto& t : tensors) {
    const std::size_t begin = data.size();
    for (float v : t.values) {
      if (type == dtype::f32) {
        data.append(reinterpret_cast<const char*>(&v), 4);
      } else {
        const std::uint16_t h = type == dtype::f16 ? f32_to_f16(v) : f32_to_bf16(v);
        data.append(reinterpret_cast<const char*>(&h), 2);
      }
    }
    header[t.name] = {{"dtype", std::string(dtype_name(type))}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const std::uint64_t length = text.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&length), 8);
  out << text << data;
}

}  // namespace moeforge::test
