// moeforge-bench cmoe: perplexity and decode speed of CMoE and its baselines
// on stories260K (tinystories eval text, ctx 512).
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/llama2c.hpp"
#include "moeforge/model/tokenizer.hpp"

namespace moeforge::cli {

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error("cannot open '" + path + "'");
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

int bench_cmoe(int argc, char** argv) {
  args a("moeforge-bench cmoe", "CMoE quality table on stories260K: perplexity and decode speed per configuration.");
  a.option("data", "DIR", "the shared data directory", data_root())
      .option("calib-tokens", "N", "calibration tokens", "8192")
      .option("eval-windows", "N", "evaluation windows of 512 tokens (0 = all)", "0")
      .option("decode-steps", "N", "greedy decode steps for tok/s", "256")
      .flag("json", "print one JSON row per configuration");
  if (!a.parse(argc, argv)) return 0;
  const std::string root = a.get("data");
  const model::weights dense = io::load_llama2c(root + "/models/stories260K/stories260K.bin");
  const model::tokenizer tok = model::load_tokenizer(root + "/models/stories260K/tok512.bin", dense.config.vocab_size);
  const auto calib = calib::calibration_windows(tok.encode(read_text(root + "/data/tinystories_calib.txt")), 512, a.get_int("calib-tokens"));
  const auto eval = tok.encode(read_text(root + "/data/tinystories_eval.txt"));
  const index_t windows = a.get_int("eval-windows"), steps = a.get_int("decode-steps");
  const index_t neurons = std::get<ffn>(dense.layers[0].ffn).intermediate();

  const double dense_ppl = model::perplexity(model::transformer(dense), eval, 512, windows).ppl;
  const double dense_tps = model::decode_tokens_per_second(model::transformer(dense), steps);
  struct row {
    const char* config;
    convert::cmoe_method method;
    double ka_fraction;
  };
  std::vector<row> rows;
  for (const char* c : {"S1A1E4", "S1A2E4", "S2A2E8", "S3A3E8", "S1A1E8", "S2A2E16", "S4A4E16"})
    for (double f : {0.0, 0.1}) rows.push_back({c, convert::cmoe_method::cmoe, f});
  for (const char* c : {"S1A1E4", "S3A3E8", "S1A1E8"}) {
    rows.push_back({c, convert::cmoe_method::random, 0.0});
    rows.push_back({c, convert::cmoe_method::cmoe, -1.0});  // S0: the same experts count, no shared expert
  }
  if (!a.flag_set("json"))
    std::cout << "dense ppl " << dense_ppl << ", decode " << dense_tps << " tok/s\n"
              << "config    method  ka    active  ppl       decode tok/s\n";
  for (const auto& r : rows) {
    convert::cmoe_options o;
    o.config = convert::parse_cmoe_config(r.config);
    o.method = r.method;
    if (r.ka_fraction > 0) o.ka_fraction = r.ka_fraction;
    if (r.ka_fraction < 0) {  // no shared expert: the shared slots become routed ones, active count kept
      o.config.active += o.config.shared;
      o.config.shared = 0;
    }
    model::weights w = dense;
    convert::cmoe_model(w, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, calib); }, o);
    const model::transformer tr(w);
    const double ppl = model::perplexity(tr, eval, 512, windows).ppl;
    const double tps = model::decode_tokens_per_second(tr, steps);
    const double active = double(o.config.shared + o.config.active) / double(o.config.experts);
    const index_t ka = convert::resolve_ka(o, neurons);
    const std::string config = convert::to_string(o.config);
    const std::string method = std::string(convert::method_name(o.method));
    if (a.flag_set("json")) {
      std::cout << nlohmann::json{{"config", config}, {"method", method}, {"ka", ka}, {"active_fraction", active},
                                  {"ppl", ppl}, {"dense_ppl", dense_ppl}, {"decode_tok_s", tps}, {"dense_decode_tok_s", dense_tps}}
                       .dump()
                << "\n";
    } else {
      std::printf("%-9s %-7s %-5lld %-7.3f %-9.3f %.0f\n", config.c_str(), method.c_str(), (long long)ka, active, ppl, tps);
    }
  }
  return 0;
}

}  // namespace moeforge::cli
