// The sparse MoE FFN kernel: executes a routing plan over tokens x [T, H].
//
// Work is cut into tasks whose shapes depend only on the plan, never on the
// thread count, so every output element is computed by the same arithmetic in
// the same order whatever OMP_NUM_THREADS is (bit-identical results):
//   phase 1, (expert × neuron-chunk) tasks: h = act(x·W_gateᵀ) ⊙ (x·W_upᵀ)
//            for the expert's tokens, gate/up/activation fused per chunk;
//   phase 2, output-row-chunk tasks: y[t, rows] += w · W_down[rows]·h, over
//            shared experts then routed experts in index order (no atomics);
//            with many experts, each expert's W_down·h is first a task of its
//            own into a part, and the row chunks add the parts in that order.
// Inside a task the products are single-threaded: the panel GEMM
// (gemm.hpp), with the weights' panels read in place when the layer was
// prepared (runtime::prepare) and packed per task otherwise, the tokens read in
// place when few and packed when many. Either way weights stream once per task
// and tokens reuse them, and the results are bit-identical. Jobs read their
// tokens' rows of x in place: a gathered copy per job cost a fresh allocation
// (page faults) and a serial copy on every call.
#pragma once

#include <algorithm>
#include <functional>
#include <numeric>
#include <vector>

#include "moeforge/detail/mul_add.hpp"
#include "moeforge/runtime/packed_ffn.hpp"
#include "moeforge/runtime/routing.hpp"

namespace moeforge::runtime {

namespace detail {

/// One expert segment's share of the batch: neurons [first, first + columns)
/// of `weights` (or of its prepared panels, `packed`) for the listed tokens,
/// with their multipliers. The neurons only some of an expert's pairs need
/// (the minor part of a major-only pair) are a job of their own, so work a
/// pair does not need is never computed.
struct job {
  const ffn* weights = nullptr;
  const packed_ffn* packed = nullptr;
  const vector* novice = nullptr;
  index_t expert = -1;  ///< the routed expert's index (-1: a shared expert or a dense FFN)
  std::vector<std::int32_t> tokens;
  std::vector<float> scale;
  std::vector<const float*> inputs;  ///< the tokens' rows of x, read in place (never gathered)
  index_t first = 0;
  index_t columns = 0;
  std::vector<float*> h_rows;  ///< the activations' rows (columns values each; run_jobs' workspace), the down projection's tokens
  /// Per token: this job's term is the first of the token's sum, so it
  /// writes y's row instead of adding to it (open_sums).
  std::vector<char> opens;
  /// When the products pack their tokens (token_form): the inputs and the
  /// activations packed once per call for all the job's tasks (in run_jobs'
  /// workspace); else none.
  prepacked_tokens input_packed, h_packed;

  bool gated() const { return packed ? packed->gated() : weights->gated(); }
  /// The tokens whose activations this process computes (all or none of them).
  index_t computed() const { return index_t(h_rows.size()); }
  activation act() const { return packed ? packed->act : weights->act; }
  /// Neurons [n0, n0 + count) of gate or up as a panel_product operand.
  weight_block neurons(bool gate, index_t n0, index_t count) const {
    if (packed) return (gate ? packed->gate : packed->up).block(n0, count, 0);
    return rows_of((gate ? weights->gate : weights->up).middleRows(n0, count));
  }
  /// Output rows [r0, r0 + rows) of down over the job's neurons.
  weight_block down(index_t r0, index_t rows) const {
    if (packed) return packed->down.block(r0, rows, first);
    return rows_of(weights->down.block(r0, first, rows, columns));
  }
  /// How its products read their tokens (gate, up and down share a format).
  token_form tokens_form() const {
    const auto m = index_t(tokens.size());
    return token_form_of(rounds_tokens(packed ? &packed->up : nullptr, m), m);
  }
  /// Where the job's neurons from `i0` (relative to first) must end a chunk:
  /// a cut of the prepared panels, or the job's end.
  index_t chunk_limit(index_t i0) const { return packed ? std::min(columns, packed->up.next_cut(first + i0) - first) : columns; }
};

/// Neurons per phase-1 task: small for few tokens (more tasks to balance the
/// weight streaming), large for many (fewer passes over the token block).
inline index_t neuron_chunk(index_t tokens) { return tokens <= 8 ? 64 : tokens <= 64 ? 128 : 256; }
/// Output rows per phase-2 task: wide tasks amortise the pass over the
/// tokens' activations (packed whole for many tokens) over more rows. Up to
/// a micro-tile of tokens, as many panels as one token reads side by side
/// (panels_together): each job's down product in a task is one stream of
/// weights from a fresh place, which takes a while to reach full speed, and
/// an expert's panels are short (BF16 experts of 704 neurons: 44 KiB). With
/// AVX-512 that is 128 rows, not 64, for 2-8 tokens too: a dense BF16 FFN at
/// 8 tokens ran 11% faster so, E8A2 and 8 experts of 704 taking all 8
/// tokens 5-6%, S3A3E8 2-4% (A/B in one process, both orders; 256 rows
/// gained a little more but leaves 8 tasks at H = 2048). (With AVX2, 64:
/// unchanged, where 128 was no faster.)
inline index_t row_chunk(index_t tokens) {
  return tokens <= gemm_mr ? std::max<index_t>(64, panels_together(1) * gemm_nr) : tokens <= gemm_tokens_in_place ? 64 : 256;
}

inline void fill_activations(job& j, index_t hidden, index_t i0, index_t count) {
  const index_t n0 = j.first + i0, n = index_t(j.inputs.size());
  thread_local std::vector<float> out;
  const index_t width = j.gated() ? 2 * count : count;
  at_least(out, std::size_t(n * width));
  if (j.gated())
    panel_product({j.neurons(true, n0, count), j.neurons(false, n0, count)}, j.inputs.data(), n, hidden, out.data(), width, j.input_packed);
  else
    panel_product({j.neurons(false, n0, count)}, j.inputs.data(), n, hidden, out.data(), width, j.input_packed);
  const bool gated = j.gated();
  for (index_t p = 0; p < n; ++p) {
    const float* o = out.data() + p * width;
    activate_row(j.act(), o, gated ? o + count : nullptr, j.h_rows[std::size_t(p)] + i0, count);
  }
}

/// Row p of `part` (leading dimension `stride`): the down products of the
/// job's token p over output rows [r0, r0 + rows).
inline void down_part(const job& j, index_t r0, index_t rows, float* part, index_t stride) {
  panel_product({j.down(r0, rows)}, j.h_rows.data(), index_t(j.tokens.size()), j.columns, part, stride, j.h_packed);
}

/// y's rows [r0, r0 + rows) of the job's tokens += scale · down_part (a
/// novice adds its vector; `part` unused), or = where the job opens the
/// token's sum: the one place a job's terms join the sum.
inline void add_part(const job& j, index_t r0, index_t rows, const float* part, index_t stride, matrix_ref y) {
  using moeforge::detail::mul_add;
  for (std::size_t p = 0; p < j.tokens.size(); ++p) {
    const float* __restrict term = j.novice ? j.novice->data() + r0 : part + index_t(p) * stride;
    float* __restrict out = y.row(j.tokens[p]).data() + r0;
    const float s = j.scale[p];
    // Opening, the same arithmetic as adding to a zeroed row (a -0 term gives +0).
    if (j.opens[p])
      for (index_t d = 0; d < rows; ++d) out[d] = mul_add(s, term[d], 0.0f);
    else
      for (index_t d = 0; d < rows; ++d) out[d] = mul_add(s, term[d], out[d]);
  }
}

/// Marks each token's first term in job order (job::opens) and returns the
/// tokens no job adds to, whose rows of y are zero. Writing the first term
/// rather than adding it to a zeroed row saves a pass over y per row chunk.
inline std::vector<index_t> open_sums(std::vector<job>& jobs, index_t tokens) {
  std::vector<char> seen(std::size_t(tokens), 0);
  for (auto& j : jobs) {
    j.opens.assign(j.tokens.size(), 0);
    for (std::size_t p = 0; p < j.tokens.size(); ++p)
      if (!seen[std::size_t(j.tokens[p])]) seen[std::size_t(j.tokens[p])] = j.opens[p] = 1;
  }
  std::vector<index_t> idle;
  for (index_t t = 0; t < tokens; ++t)
    if (!seen[std::size_t(t)]) idle.push_back(t);
  return idle;
}

inline void add_rows(const job& j, index_t r0, index_t rows, matrix_ref y) {
  thread_local std::vector<float> part;
  if (!j.novice) {
    at_least(part, j.tokens.size() * std::size_t(rows));
    down_part(j, r0, rows, part.data(), rows);
  }
  add_part(j, r0, rows, part.data(), rows, y);
}

/// A phase-1 task: neurons [first, first + count) of jobs[job].
struct activation_task {
  std::size_t job;
  index_t first, count;
};

/// Phase 1's tasks over the jobs `wanted(k)` selects, whose activations get
/// rows in thread_scratch (or `own`), and the multiply-adds of those jobs in
/// `fma`.
template <class Wanted>
std::vector<activation_task> activation_tasks(std::vector<job>& jobs, index_t hidden, Wanted wanted, double& fma, std::vector<float>& own) {
  const auto computes = [&](std::size_t k) { return !jobs[k].novice && !jobs[k].tokens.empty() && wanted(k); };
  std::size_t values = 0;
  for (std::size_t k = 0; k < jobs.size(); ++k)
    if (computes(k)) values += jobs[k].tokens.size() * std::size_t(jobs[k].columns);
  struct activations;
  float* free_values = thread_scratch<activations>(values, own);
  std::vector<activation_task> tasks;
  fma = 0;
  for (std::size_t k = 0; k < jobs.size(); ++k) {
    if (!computes(k)) continue;
    auto& j = jobs[k];
    fma += double(j.tokens.size()) * double(j.columns) * double(hidden) * (j.gated() ? 3 : 2);
    j.h_rows.clear();
    for (std::size_t p = 0; p < j.tokens.size(); ++p, free_values += j.columns) j.h_rows.push_back(free_values);
    const index_t step = neuron_chunk(index_t(j.tokens.size()));
    for (index_t i = 0; i < j.columns;) {
      const index_t end = std::min(i + step, j.chunk_limit(i));
      tasks.push_back({k, i, end - i});
      i = end;
    }
  }
  return tasks;
}

/// The jobs' work shared with other processes (expert parallelism,
/// distributed/): this process computes the down products of the jobs
/// `computes` marks into `part[k]` ([tokens, H] rows), `exchange` then fills
/// every other job's part (from the processes that computed it), and the sum
/// adds the parts in job order, so the output is the single-process one bit
/// for bit.
struct job_split {
  std::vector<char> computes;  ///< per job: this process computes it
  std::vector<float*> part;    ///< per job: its down products; null for a novice or an empty job
  std::function<void()> exchange;
};

/// Down products of this many jobs or more are computed job by job into
/// parts and then summed by row chunks; fewer are computed row chunk by row
/// chunk across the jobs, which balances a few large jobs between the threads.
/// On Qwen3-30B-A3B's layer (128 experts of 768) the row chunks cut the down
/// phase into thousands of short products: job by job it streamed 10-24%
/// faster at 1-8 tokens per expert (F32 and BF16, alternated in one process);
/// the whole layer at 16 tokens (one per expert) ran 6-12% faster, at 64
/// tokens within the noise (±3%).
constexpr std::size_t jobs_down_by_job = 16;
/// ... as long as the parts take at most this many bytes (tokens × H floats per
/// job): at 32 tokens per expert, 32 MB of parts made the layer slower.
constexpr std::size_t max_part_bytes = std::size_t(16) << 20;

/// Runs the jobs: every job's activations, then every output row chunk; with
/// `split`, only this process's jobs, their down products into their parts,
/// the exchange, and then the row chunks from the parts. Without a split, a
/// layer of many jobs (jobs_down_by_job) gets parts of its own in the same
/// way, with nothing to exchange.
inline void run_jobs(std::vector<job>& jobs, const_matrix_ref x, matrix_ref y, const job_split* split = nullptr) {
  double fma = 0;
  std::vector<float> own_activations;
  const auto chunks = activation_tasks(jobs, x.cols(), [&](std::size_t k) { return !split || split->computes[k]; }, fma, own_activations);
  const index_t hidden = y.cols();
  const index_t rows_per_task = row_chunk(x.rows());
  const index_t row_tasks = (hidden + rows_per_task - 1) / rows_per_task;
  const auto rows_of_task = [&](index_t r) { return std::min(rows_per_task, hidden - r * rows_per_task); };
  // This process's parts: the split's, or its own when the layer has many jobs.
  job_split local;
  std::vector<float> own_parts;
  const job_split* parts = split;
  if (!split) {
    std::size_t computed = 0, values = 0;
    for (const auto& j : jobs)
      if (j.computed() > 0) ++computed, values += std::size_t(j.computed()) * std::size_t(hidden);
    if (computed >= jobs_down_by_job && values * sizeof(float) <= max_part_bytes) {
      struct down_parts;
      float* free_values = thread_scratch<down_parts>(values, own_parts);
      local.computes.assign(jobs.size(), 1);
      local.part.assign(jobs.size(), nullptr);
      for (std::size_t k = 0; k < jobs.size(); ++k)
        if (jobs[k].computed() > 0) local.part[k] = free_values, free_values += std::size_t(jobs[k].computed()) * std::size_t(hidden);
      parts = &local;
    }
  }
  const std::vector<index_t> idle = open_sums(jobs, x.rows());
  const auto sum_rows = [&](index_t r) {
    const index_t r0 = r * rows_per_task, rows = rows_of_task(r);
    for (const index_t t : idle) y.row(t).segment(r0, rows).setZero();
    for (std::size_t k = 0; k < jobs.size(); ++k) {
      if (jobs[k].tokens.empty()) continue;
      if (!parts)
        add_rows(jobs[k], r0, rows, y);
      else
        add_part(jobs[k], r0, rows, parts->part[k] ? parts->part[k] + r0 : nullptr, hidden, y);
    }
  };
  // The down products that go into parts here: a job's whole output when
  // there are many jobs and it has at most a token panel of tokens (more
  // would accumulate tiles for every output row at once, past L2: DeepSeek-
  // V2-Lite's shared expert at 64 tokens made the layer 5-15% slower so), else
  // row chunk by row chunk.
  struct down_task {
    std::size_t job;
    index_t first, rows;
  };
  std::vector<down_task> down_tasks;
  if (parts) {
    std::vector<std::size_t> mine;
    for (std::size_t k = 0; k < jobs.size(); ++k)
      if (parts->computes[k] && parts->part[k]) mine.push_back(k);
    for (const std::size_t k : mine) {
      const index_t step = mine.size() >= jobs_down_by_job && jobs[k].computed() <= gemm_mr ? hidden : rows_per_task;
      for (index_t r0 = 0; r0 < hidden; r0 += step) down_tasks.push_back({k, r0, std::min(step, hidden - r0)});
    }
  }
  // Tokens that several of a job's products read, packed (F32 panels or
  // BF16 pairs) once, on the team, not by each: its inputs, read by its
  // phase-1 tasks, and its activations, read by its down products (one per
  // row chunk, or its down tasks when it has a part).
  std::vector<index_t> input_readers(jobs.size(), 0), h_readers(jobs.size(), parts ? 0 : row_tasks);
  for (const auto& c : chunks) ++input_readers[c.job];
  for (const auto& t : down_tasks) ++h_readers[t.job];
  std::vector<token_panel_fill> input_fills, h_fills;
  token_storage packs;
  for (std::size_t k = 0; k < jobs.size(); ++k)
    if (!jobs[k].h_rows.empty()) {
      job& j = jobs[k];
      packs.add(j.inputs.data(), j.computed(), x.cols(), j.tokens_form(), input_readers[k] > 1, j.input_packed, input_fills);
      packs.add(j.h_rows.data(), j.computed(), j.columns, j.tokens_form(), h_readers[k] > 1, j.h_packed, h_fills);
    }
  packs.place();
  run_on_team(fma >= min_parallel_fma, [&] {
    pack_token_panels(input_fills);
    for_each_task(std::ptrdiff_t(chunks.size()), [&](std::ptrdiff_t c) {
      fill_activations(jobs[chunks[std::size_t(c)].job], x.cols(), chunks[std::size_t(c)].first, chunks[std::size_t(c)].count);
    });
    pack_token_panels(h_fills);
    if (parts)
      for_each_task(std::ptrdiff_t(down_tasks.size()), [&](std::ptrdiff_t d) {
        const down_task& t = down_tasks[std::size_t(d)];
        down_part(jobs[t.job], t.first, t.rows, parts->part[t.job] + t.first, hidden);
      });
    if (!split) for_each_task(row_tasks, sum_rows);
  });
  if (!split) return;
  // Outside any parallel region: only the thread that started MPI may call it.
  split->exchange();
  run_on_team(fma >= min_parallel_fma, [&] { for_each_task(row_tasks, sum_rows); });
}

/// The jobs of routed expert `ex` (its prepared panels `packed`, or null) for
/// plan pairs [p0, p1): one per segment between consecutive widths the pairs
/// ask for, each over the pairs that need that segment. A sub-expert boundary
/// (`parts`) that no pair's width falls on does not cut: the same tokens over
/// adjacent neurons are one job, whose longer rows stream better (cutting at
/// every part cost up to 10% at one token and 25-35% at 16 tokens per expert
/// on the E8A2 layer, for the same result).
inline void add_expert_jobs(const routed_expert& ex, const packed_ffn* packed, const routing_plan& plan, index_t p0, index_t p1,
                            const_matrix_ref x, std::vector<job>& jobs) {
  if (!packed) require_held(ex.weights, "moe expert");
  std::vector<index_t> cuts;
  for (index_t p = p0; p < p1; ++p) cuts.push_back(plan.width[std::size_t(p)]);
  cuts.push_back(ex.width());
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  index_t a = 0;
  for (const index_t b : cuts) {
    if (b <= a) continue;
    job j;
    j.weights = &ex.weights;
    j.packed = packed;
    j.first = a;
    j.columns = b - a;
    for (index_t p = p0; p < p1; ++p)
      if (plan.width[std::size_t(p)] >= b) {
        j.tokens.push_back(plan.token[std::size_t(p)]);
        j.scale.push_back(plan.weight[std::size_t(p)]);
        j.inputs.push_back(x.row(plan.token[std::size_t(p)]).data());
      }
    jobs.push_back(std::move(j));
    a = b;
  }
}

inline job whole_batch_job(const ffn& f, const packed_ffn* packed, const_matrix_ref x) {
  if (!packed) require_held(f, "ffn");
  job j;
  j.weights = &f;
  j.packed = packed;
  j.tokens.resize(std::size_t(x.rows()));
  std::iota(j.tokens.begin(), j.tokens.end(), 0);
  j.scale.assign(std::size_t(x.rows()), 1.0f);
  for (index_t t = 0; t < x.rows(); ++t) j.inputs.push_back(x.row(t).data());
  j.columns = f.intermediate();
  return j;
}

/// Throws before any parallel work if x cannot be fed to a layer of `hidden` features.
inline void check_input(const_matrix_ref x, const_matrix_ref y, index_t hidden, const char* what) {
  using moeforge::detail::cat;
  if (x.cols() != hidden) throw shape_error(cat(what, ": input has ", x.cols(), " features, expected ", hidden));
  moeforge::detail::require_shape(y, x.rows(), hidden, what, " output");
  moeforge::detail::require_finite_rows(x, what, ": input token");
}

}  // namespace detail

/// Novice compensation (see moeforge::novice_compensation): y += bias − Σ
/// over the plan's pairs of means[expert], H adds per pair. A token that
/// computes every expert gets nothing (exactly, not up to rounding). Serial,
/// in plan order, so the sums do not depend on the thread count.
inline void add_compensation(const moe_layer& m, const routing_plan& plan, matrix_ref y) {
  const auto& c = m.compensation;
  if (!c.active()) return;
  std::vector<index_t> computed(std::size_t(plan.tokens), 0);
  for (const auto t : plan.token) ++computed[std::size_t(t)];
  const auto partial = [&](index_t t) { return computed[std::size_t(t)] < plan.experts(); };
  for (index_t t = 0; t < plan.tokens; ++t)
    if (partial(t)) y.row(t) += c.bias.transpose();
  for (index_t e = 0; e < plan.experts(); ++e)
    for (index_t p = plan.offsets[std::size_t(e)]; p < plan.offsets[std::size_t(e + 1)]; ++p)
      if (partial(plan.token[std::size_t(p)])) y.row(plan.token[std::size_t(p)]) -= c.means.row(e);
}

namespace detail {

/// The kernel's jobs for `plan` in the order their terms are summed: shared
/// experts, then routed experts (a novice's pairs as one job) in index order.
/// Throws shape_error for a plan pair wider than its expert.
inline std::vector<job> make_jobs(const moe_layer& m, const packed_layer* packed, const routing_plan& plan, const_matrix_ref x) {
  using moeforge::detail::cat;
  std::vector<detail::job> jobs;
  for (std::size_t s = 0; s < m.shared.size(); ++s) {
    jobs.push_back(detail::whole_batch_job(m.shared[s].weights, packed ? &packed->shared[s] : nullptr, x));
    std::copy_n(plan.shared_weight.begin() + std::ptrdiff_t(s * std::size_t(x.rows())), x.rows(), jobs.back().scale.begin());
  }
  for (index_t e = 0; e < m.num_experts(); ++e) {
    const auto& ex = m.experts[std::size_t(e)];
    const index_t p0 = plan.offsets[std::size_t(e)], p1 = plan.offsets[std::size_t(e + 1)];
    for (index_t p = p0; p < p1; ++p) {
      const auto w = plan.width[std::size_t(p)];
      if (!ex.is_novice() && (w < 0 || w > ex.width()))
        throw shape_error(cat("moe: plan pair ", p, " asks expert ", e, " for ", w, " neurons, it has ", ex.width()));
    }
    if (ex.is_novice()) {
      detail::job j;
      j.novice = &ex.novice;
      j.expert = e;
      for (index_t p = p0; p < p1; ++p) {
        j.tokens.push_back(plan.token[std::size_t(p)]);
        j.scale.push_back(plan.weight[std::size_t(p)]);
      }
      jobs.push_back(std::move(j));
      continue;
    }
    const std::size_t first_job = jobs.size();
    detail::add_expert_jobs(ex, packed ? &packed->experts[std::size_t(e)] : nullptr, plan, p0, p1, x, jobs);
    for (std::size_t k = first_job; k < jobs.size(); ++k) jobs[k].expert = e;
  }
  return jobs;
}

/// Throws shape_error unless `plan` was made for x and layer m and holds
/// together (a caller may build one by hand): offsets that run from 0 up to
/// its pairs, each pair's token, weight and width, tokens of the batch.
inline void check_plan(const moe_layer& m, const routing_plan& plan, const_matrix_ref x) {
  using moeforge::detail::cat;
  if (plan.tokens != x.rows() || plan.offsets.empty() || plan.experts() != m.num_experts() ||
      plan.shared_weight.size() != m.shared.size() * std::size_t(x.rows()))
    throw shape_error(cat("moe: the routing plan was made for ", plan.tokens, " tokens and ", plan.experts(), " experts, not ", x.rows(), " and ",
                          m.num_experts()));
  const auto pairs = std::size_t(plan.pairs());
  if (plan.weight.size() != pairs || plan.width.size() != pairs)
    throw shape_error(cat("moe: the routing plan has ", pairs, " pairs' tokens but ", plan.weight.size(), " weights and ", plan.width.size(), " widths"));
  if (plan.offsets.front() != 0 || std::size_t(plan.offsets.back()) != pairs || !std::is_sorted(plan.offsets.begin(), plan.offsets.end()))
    throw shape_error(cat("moe: the routing plan's offsets must rise from 0 to its ", pairs, " pairs"));
  for (std::size_t p = 0; p < pairs; ++p)
    if (plan.token[p] < 0 || plan.token[p] >= x.rows())
      throw shape_error(cat("moe: routing plan pair ", p, " names token ", plan.token[p], ", the batch has ", x.rows()));
}

/// moe_forward reading each expert's weights from m's panels (`packed`), or
/// from m itself (packed per task) when null.
inline void moe_forward_packed(const moe_layer& m, const packed_layer* packed, const routing_plan& plan, const_matrix_ref x, matrix_ref y) {
  detail::check_input(x, y, m.hidden(), "moe");
  check_plan(m, plan, x);
  std::vector<detail::job> jobs = make_jobs(m, packed, plan, x);
  if (x.rows() == 0) return;
  detail::run_jobs(jobs, x, y);
  add_compensation(m, plan, y);
}

}  // namespace detail

/// y [T, H] = Σ_shared w_s(t)·shared_s(x_t) + Σ_pairs w·expert_e[:width](x_t)
/// (a novice pair adds w·novice), plus the layer's novice compensation. y is overwritten. Throws shape_error or
/// value_error (NaN/Inf in x) before any work starts.
inline void moe_forward(const moe_layer& m, const routing_plan& plan, const_matrix_ref x, matrix_ref y) {
  detail::moe_forward_packed(m, nullptr, plan, x, y);
}

/// Routes x with the layer's router and runs the work its drop policy keeps
/// (route(): every selected expert in full when it has none).
inline matrix moe_forward(const moe_layer& m, const_matrix_ref x) {
  matrix y(x.rows(), m.hidden());
  moe_forward(m, route(m, x), x, y);
  return y;
}

}  // namespace moeforge::runtime
