// Evaluation: perplexity with the CMoE paper's protocol (one BOS-prefixed
// stream, consecutive windows each from an empty cache) and decode speed.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <vector>

#include "moeforge/model/transformer.hpp"

namespace moeforge::model {

/// Consecutive non-overlapping windows of `ctx` tokens; a last partial window
/// is kept when it has at least 2 tokens (it predicts at least one).
inline std::vector<std::vector<std::int32_t>> make_windows(const std::vector<std::int32_t>& stream, index_t ctx) {
  if (ctx < 2) throw config_error(detail::cat("windows: ctx = ", ctx, ", expected at least 2"));
  std::vector<std::vector<std::int32_t>> out;
  for (std::size_t s = 0; s < stream.size(); s += std::size_t(ctx)) {
    const std::size_t e = std::min(stream.size(), s + std::size_t(ctx));
    if (e - s < 2) break;
    out.emplace_back(stream.begin() + std::ptrdiff_t(s), stream.begin() + std::ptrdiff_t(e));
  }
  return out;
}

struct perplexity_result {
  double ppl = 0.0;
  double nll = 0.0;         ///< total negative log-likelihood (nats)
  index_t tokens = 0;       ///< tokens in the stream, BOS included (in the windows scored, when max_windows cut it short)
  index_t predicted = 0;    ///< tokens scored: each window's 1..len-1
  index_t windows = 0;
  double seconds = 0.0;
  /// Tokens/s of the whole evaluation, windows side by side (one per thread):
  /// a throughput figure, not the speed one stream sees (see prefill_tokens_per_second).
  double throughput_tokens_per_second = 0.0;
  /// The FFN work actually done, per layer and summed: realised drop rate and
  /// active fraction under the model's drop policies.
  std::vector<runtime::route_stats> layer_work;
  runtime::route_stats work;
};

/// Negative log-likelihood of each window's tokens 1..len-1 given the ones
/// before; adds each layer's FFN work to `work` when given (sized to the layers).
inline double window_nll(const transformer& tr, const std::vector<std::int32_t>& window,
                         std::vector<runtime::route_stats>* work = nullptr) {
  kv_cache cache = tr.new_cache();
  forward_options opt;
  if (work) opt.on_route = [work](index_t layer, const runtime::route_stats& s) { (*work)[std::size_t(layer)] += s; };
  const matrix logits = tr.forward(window, cache, opt);
  double nll = 0.0;
  for (std::size_t t = 0; t + 1 < window.size(); ++t) {
    const auto row = logits.row(index_t(t));
    const float mx = row.maxCoeff();
    const double lse = double(mx) + std::log(double((row.array() - mx).exp().sum()));
    nll += lse - double(row[window[t + 1]]);
  }
  return nll;
}

/// Perplexity of `stream` (already BOS-prefixed) in windows of `ctx` tokens
/// (ctx <= 0: the model's context). `max_windows` > 0 scores only the first ones.
inline perplexity_result perplexity(const transformer& tr, const std::vector<std::int32_t>& stream, index_t ctx = 0,
                                    index_t max_windows = 0) {
  if (ctx <= 0) ctx = tr.config().seq_len;
  if (ctx > tr.config().seq_len)
    throw config_error(detail::cat("perplexity: ctx = ", ctx, " exceeds the model's context of ", tr.config().seq_len));
  auto windows = make_windows(stream, ctx);
  const bool cut = max_windows > 0 && index_t(windows.size()) > max_windows;
  if (cut) windows.resize(std::size_t(max_windows));
  if (windows.empty()) throw config_error("perplexity: the text has fewer than 2 tokens");
  std::vector<double> nll(windows.size());
  const std::size_t layers = std::size_t(tr.config().n_layers);
  std::vector<std::vector<runtime::route_stats>> work(windows.size(), std::vector<runtime::route_stats>(layers));
  const auto t0 = std::chrono::steady_clock::now();
  // Windows are independent: one per thread, summed in window order afterwards
  // so the total does not depend on the thread count. A collective model
  // (expert parallelism) runs them one at a time, in the same order on every process.
  // A failure (a token outside the vocabulary) must not leave the parallel
  // region, which would terminate the process: the first window's is rethrown
  // after it. A collective model runs no window after a failed one, whose
  // exchanges the other processes would pair with the failed window's.
  std::vector<std::exception_ptr> failed(windows.size());
  bool stopped = false;  // written only when collective, where one thread runs the loop
#pragma omp parallel for schedule(dynamic, 1) if (!tr.collective())
  for (std::ptrdiff_t i = 0; i < std::ptrdiff_t(windows.size()); ++i) {
    if (stopped) continue;
    try {
      nll[std::size_t(i)] = window_nll(tr, windows[std::size_t(i)], &work[std::size_t(i)]);
    } catch (...) {
      failed[std::size_t(i)] = std::current_exception();
      if (tr.collective()) stopped = true;
    }
  }
  for (std::size_t i = 0; i < windows.size(); ++i)
    if (failed[i]) {
      const std::size_t first = i * std::size_t(ctx);
      moeforge::detail::rethrow_in_context(failed[i], detail::cat("perplexity: window ", i, " (stream tokens ", first, "..",
                                                                  first + windows[i].size() - 1, "): "));
    }
  perplexity_result r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.layer_work.resize(layers);
  for (std::size_t i = 0; i < windows.size(); ++i) {
    for (std::size_t l = 0; l < layers; ++l) r.layer_work[l] += work[i][l];
    r.nll += nll[i];
    r.tokens += index_t(windows[i].size());
    r.predicted += index_t(windows[i].size()) - 1;
  }
  if (!cut) r.tokens = index_t(stream.size());  // with a last token no window predicts from
  for (const auto& l : r.layer_work) r.work += l;
  r.windows = index_t(windows.size());
  r.ppl = std::exp(r.nll / double(r.predicted));
  r.throughput_tokens_per_second = double(r.tokens) / r.seconds;
  return r;
}

/// Token ids for speed runs that do not need a text: spread over the
/// vocabulary (what the ids are does not change a dense model's cost; for an
/// MoE they vary the routing as real text does).
inline std::vector<std::int32_t> synthetic_tokens(const config& c, index_t count, index_t offset = 0) {
  std::vector<std::int32_t> ids(std::size_t(std::max<index_t>(count, 0)));
  for (index_t i = 0; i < count; ++i) ids[std::size_t(i)] = std::int32_t((std::uint64_t(i + offset) * 7919u + 17u) % std::uint64_t(c.vocab_size));
  return ids;
}

/// Single-stream prefill speed: tokens/s of feeding `tokens` tokens to an
/// empty cache in one forward pass (logits of the last position only, as a
/// generation would), best of `reps` runs after one warm-up run. `times`,
/// when given, receives the stage times of the best run.
inline double prefill_tokens_per_second(const transformer& tr, index_t tokens, int reps = 3, stage_times* times = nullptr) {
  const auto& c = tr.config();
  if (tokens < 1 || tokens > c.seq_len)
    throw config_error(detail::cat("prefill speed: ", tokens, " tokens, expected 1..", c.seq_len, " (the model's context)"));
  const auto ids = synthetic_tokens(c, tokens);
  double best = 0;
  for (int r = 0; r <= std::max(reps, 1); ++r) {
    kv_cache cache = tr.new_cache();
    stage_times run;
    forward_options opt;
    opt.all_logits = false;
    opt.times = &run;
    const auto t0 = std::chrono::steady_clock::now();
    tr.forward(ids, cache, opt);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0 && (best == 0 || s < best)) {
      best = s;
      if (times) *times = run;
    }
  }
  return double(tokens) / best;
}

/// Warmed one-token decode speed: after a prefill of `context` tokens and
/// two untimed steps, tokens/s over `steps` greedy steps (fewer when the
/// context runs out; at least one). `times` receives the timed steps' stage times.
inline double decode_tokens_per_second(const transformer& tr, index_t steps, index_t context = 0, stage_times* times = nullptr) {
  const auto& c = tr.config();
  constexpr index_t warmup = 2;
  if (context < 0 || context + warmup + 1 > c.seq_len)
    throw config_error(detail::cat("decode speed: context ", context, " leaves no room for a decode step in the model's context of ", c.seq_len));
  steps = std::max<index_t>(1, std::min(steps, c.seq_len - context - warmup));
  kv_cache cache = tr.new_cache();
  forward_options last_only;
  last_only.all_logits = false;
  std::int32_t token = c.bos_token;
  if (context > 0) tr.forward(synthetic_tokens(c, context), cache, last_only);
  auto step = [&] {
    const matrix logits = tr.forward({token}, cache, last_only);
    Eigen::Index best;
    logits.row(0).maxCoeff(&best);
    token = std::int32_t(best);
  };
  for (index_t i = 0; i < warmup; ++i) step();
  stage_times run;
  last_only.times = &run;
  const auto t0 = std::chrono::steady_clock::now();
  for (index_t i = 0; i < steps; ++i) step();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (times) *times = run;
  return double(steps) / s;
}

}  // namespace moeforge::model
