// moeforge logits: the logits at every position of a token sequence, for
// cross-checking against other implementations.
#include <iostream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "model_args.hpp"
#include "moeforge/model/transformer.hpp"

namespace moeforge::cli {

namespace {

std::vector<std::int32_t> parse_tokens(const std::string& list) {
  std::vector<std::int32_t> out;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      std::size_t end = 0;
      const long v = std::stol(item, &end);
      if (end != item.size() || v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max())
        throw std::invalid_argument(item);
      out.push_back(std::int32_t(v));
    } catch (const std::exception&) {
      throw usage_error("moeforge logits: --tokens expects comma-separated integers, got '" + item + "'");
    }
  }
  if (out.empty()) throw usage_error("moeforge logits: --tokens is empty");
  return out;
}

}  // namespace

int run_logits(int argc, char** argv) {
  args a("moeforge logits", "Print the logits at every position of a token sequence.");
  add_model_options(a, true);  // (the tokenizer reads --calibration text for a balanced expert-parallel placement)
  add_dtype_option(a);
  a.required("tokens", "LIST", "comma-separated token ids, e.g. 1,403,407");
  a.flag("json", "print {\"tokens\": [...], \"logits\": [[...], ...]} (the default output is one line per position)");
  if (!a.parse(argc, argv)) return 0;
  const auto tokens = parse_tokens(a.get("tokens"));
  const model::transformer tr = load_transformer(a);  // owning: it runs on prepared layouts of --dtype weights, read layer by layer
  auto cache = tr.new_cache();
  const matrix logits = tr.forward(tokens, cache);
  if (a.flag_set("json")) {
    nlohmann::json rows = nlohmann::json::array();
    for (index_t t = 0; t < logits.rows(); ++t) rows.push_back(std::vector<float>(logits.row(t).data(), logits.row(t).data() + logits.cols()));
    std::cout << nlohmann::json{{"tokens", tokens}, {"logits", rows}}.dump() << "\n";
  } else {
    for (index_t t = 0; t < logits.rows(); ++t) {
      std::cout << t;
      for (index_t v = 0; v < logits.cols(); ++v) std::cout << ' ' << logits(t, v);
      std::cout << '\n';
    }
  }
  return 0;
}

}  // namespace moeforge::cli
