// Converts stories260K's dense FFNs into CMoE S2A4E8 experts, saves the model
// and prints its perplexity on held-out text. The lines between the README
// markers are the README's C++ example, word for word (ctest checks it).
// Usage: convert_cmoe DATA OUT [EVAL_WINDOWS]  (DATA: the folder holding
// models/stories260K/ and data/, e.g. ../shared; EVAL_WINDOWS: 0 = all)
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include <moeforge/moeforge.hpp>

#include "arguments.hpp"

static std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw moeforge::io_error("cannot open '" + path + "'");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s DATA OUT [EVAL_WINDOWS]\n", argv[0]);
    return 2;
  }
  const std::string data = argv[1], out = argv[2], models = data + "/models/stories260K/";
  // save_native would refuse it too, but only after the conversion.
  if (std::filesystem::exists(out)) throw moeforge::config_error("OUT '" + out + "' exists: give a new directory");
  const std::string calib_text = read_text(data + "/data/tinystories_calib.txt");
  const std::string eval_text = read_text(data + "/data/tinystories_eval.txt");
  const moeforge::index_t eval_windows = argc > 3 ? number_argument<moeforge::index_t>(argv[3], "EVAL_WINDOWS", 0, 1 << 30) : 0;

  // README begin
  auto w = moeforge::io::load_model(models + "stories260K.bin");  // .bin, HF dir, .safetensors + config, native dir
  auto tok = moeforge::model::load_tokenizer(models + "tok512.bin", w.config.vocab_size);
  auto windows = moeforge::calib::calibration_windows(tok.encode(calib_text), 512, 8192);

  moeforge::convert::cmoe_options opt;
  opt.config = moeforge::convert::parse_cmoe_config("S2A4E8");
  moeforge::convert::cmoe_model(w, [&](const moeforge::model::weights& m, moeforge::index_t layer) {
    return moeforge::calib::ffn_inputs(m, layer, windows);  // layer l calibrates on the model converted up to l-1
  }, opt);
  moeforge::io::save_native(w, out);  // atomic; refuses to clobber an existing directory

  moeforge::model::transformer tr(w);  // every FFN runs on the sparse kernel
  auto ppl = moeforge::model::perplexity(tr, tok.encode(eval_text), 512, eval_windows);
  // README end

  std::printf("wrote %s: perplexity %.4f over %lld tokens, FFN work %.3f of dense\n", out.c_str(), ppl.ppl,
              static_cast<long long>(ppl.predicted), ppl.work.active_fraction());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
