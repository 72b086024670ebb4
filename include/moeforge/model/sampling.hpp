// Choosing the next token: greedy (temperature 0) or temperature + top-p
// sampling from a seeded generator, and run.c-style generation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "moeforge/model/transformer.hpp"

namespace moeforge::model {

struct sampling_options {
  float temperature = 0.0f;  ///< 0 = greedy
  float top_p = 1.0f;        ///< nucleus: smallest set of tokens whose probability reaches top_p
  std::uint64_t seed = 42;
};

class sampler {
 public:
  explicit sampler(const sampling_options& o) : opt_(o), rng_(o.seed) {
    if (!(o.temperature >= 0.0f) || !std::isfinite(o.temperature))
      throw config_error(detail::cat("sampling: temperature = ", o.temperature, ", expected a finite value >= 0"));
    if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) throw config_error(detail::cat("sampling: top_p = ", o.top_p, ", expected (0, 1]"));
  }

  /// The next token for one row of logits; ties in greedy go to the lower id.
  /// A logit may be -inf (a token masked out); throws shape_error for an
  /// empty row and value_error for a NaN, a +inf, or every token masked.
  std::int32_t next(const Eigen::Ref<const Eigen::RowVectorXf>& logits) {
    const index_t v = logits.size();
    if (v == 0) throw shape_error("sampling: the row of logits is empty");
    check_logits(logits);
    if (opt_.temperature == 0.0f) {
      index_t best = 0;
      for (index_t i = 1; i < v; ++i)
        if (logits[i] > logits[best]) best = i;
      return std::int32_t(best);
    }
    std::vector<double> p(static_cast<std::size_t>(v));
    const double mx = double(logits.maxCoeff());
    double sum = 0.0;
    for (index_t i = 0; i < v; ++i) sum += p[std::size_t(i)] = std::exp((double(logits[i]) - mx) / opt_.temperature);
    std::vector<std::int32_t> order(p.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return p[std::size_t(a)] > p[std::size_t(b)]; });
    double kept = 0.0;
    std::size_t count = 0;
    while (count < order.size() && (count == 0 || kept < opt_.top_p * sum)) kept += p[std::size_t(order[count++])];
    // 53 random bits: the same draw on every platform, unlike std distributions.
    const double u = double(rng_() >> 11) * (1.0 / 9007199254740992.0) * kept;
    double acc = 0.0;
    for (std::size_t i = 0; i < count; ++i) {
      acc += p[std::size_t(order[i])];
      if (u < acc) return order[i];
    }
    return order[count - 1];
  }

 private:
  /// Greedy would return token 0 for a row of NaN, and sampling draws from
  /// exp(NaN) (a +inf maximum makes every difference NaN): both would hand a
  /// broken model's output on as a token.
  static void check_logits(const Eigen::Ref<const Eigen::RowVectorXf>& logits) {
    for (index_t i = 0; i < logits.size(); ++i)
      if (std::isnan(logits[i]) || logits[i] == std::numeric_limits<float>::infinity())
        throw value_error(detail::cat("sampling: logit ", i, " is ", logits[i], " (expected a finite value, or -inf for a masked token)"));
    if (!std::isfinite(logits.maxCoeff())) throw value_error("sampling: every token is masked (all logits are -inf)");
  }

  sampling_options opt_;
  std::mt19937_64 rng_;
};

/// run.c's generation: starting with `prompt` (BOS first), feed the prompt,
/// then sample until `steps` positions are filled or BOS comes again. Returns
/// every token, prompt included.
inline std::vector<std::int32_t> generate(const transformer& tr, std::vector<std::int32_t> prompt, index_t steps,
                                          const sampling_options& opt) {
  const index_t limit = std::min<index_t>(steps, tr.config().seq_len);
  if (prompt.empty()) prompt.push_back(tr.config().bos_token);
  if (index_t(prompt.size()) > limit)
    throw config_error(detail::cat("generate: the prompt has ", prompt.size(), " tokens, more than the ", limit, " positions allowed"));
  sampler pick(opt);
  kv_cache cache = tr.new_cache();
  forward_options last_only;
  last_only.all_logits = false;
  std::vector<std::int32_t> out = prompt;
  matrix logits = tr.forward(prompt, cache, last_only);
  // Positions 0..limit-1 are fed; the token at position `limit` is the last one produced.
  while (true) {
    const std::int32_t next = pick.next(logits.row(0));
    if (next == tr.config().bos_token) break;
    out.push_back(next);
    if (index_t(out.size()) > limit) break;
    logits = tr.forward({next}, cache, last_only);
  }
  return out;
}

}  // namespace moeforge::model
