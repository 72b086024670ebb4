// Expert parallelism over MPI: one model run by several processes (ranks),
// each holding only its share of the routed experts (see placement.hpp).
//
// Every rank runs the replicated parts (embedding, attention, norms, routers,
// shared experts, novices, the head) on the same tokens: deterministic, no
// communication. In each MoE layer a rank computes its experts' down
// products, unscaled, for the tokens routed to them, one block per kernel job;
// one MPI_Allgatherv gives every rank every block, and each rank then sums
// the blocks as the single-process kernel does: in the kernel's job order,
// through the kernel's own add (runtime::detail::add_part). The blocks are the
// arithmetic of the single-process jobs (same tokens, same neurons, same
// panels), so the outputs are bit-identical to the single-process run's for
// any number of ranks and any placement; a sum of per-rank partial outputs
// would round in another order. The price is bytes: one H-vector per job
// row, i.e. per routed (token, expert) pair, and per segment for an expert
// whose pairs ask for different widths (DualSparse's major-only pairs, sub-
// expert cuts), instead of one per token and rank; the same for top-2 on two
// ranks without split experts.
//
// Using this header needs MPI (link MPI::MPI_CXX); the rest of moeforge does not.
#pragma once

#include <mpi.h>
#include <omp.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moeforge/distributed/placement.hpp"
#include "moeforge/model/transformer.hpp"
#include "moeforge/runtime/moe_ffn.hpp"

namespace moeforge::distributed {

/// MPI for a program's lifetime (MPI_Init_thread / MPI_Finalize). Only the
/// thread that made it calls MPI; OpenMP threads never do.
class mpi_session {
 public:
  mpi_session() : mpi_session(nullptr, nullptr) {}
  mpi_session(int* argc, char*** argv) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  mpi_session(const mpi_session&) = delete;
  mpi_session& operator=(const mpi_session&) = delete;
  ~mpi_session() { MPI_Finalize(); }
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  int rank_ = 0, size_ = 1;
};

inline int comm_rank(MPI_Comm comm) {
  int r = 0;
  MPI_Comm_rank(comm, &r);
  return r;
}
inline int comm_size(MPI_Comm comm) {
  int n = 1;
  MPI_Comm_size(comm, &n);
  return n;
}

/// Runs `work` and returns its result; if it throws on any rank, that rank
/// prints "moeforge: rank R of N failed: <reason>" on stderr (which mpirun
/// forwards) and aborts the whole job with exit code 1. Other ranks may be
/// waiting in a collective the failed rank will never reach, so only an abort
/// ends them: a job never hangs on one rank's error.
[[noreturn]] inline void abort_job(MPI_Comm comm, const std::string& reason) {
  // One write, so mpirun's own abort notice cannot split the line.
  std::cerr << moeforge::detail::cat("moeforge: rank ", comm_rank(comm), " of ", comm_size(comm), " failed: ", reason, "\n") << std::flush;
  MPI_Abort(comm, 1);
  std::abort();  // MPI_Abort does not return; this satisfies the compiler's flow analysis
}

template <class Work>
auto run_or_abort(MPI_Comm comm, Work&& work) -> decltype(work()) {
  std::string reason = "unknown exception";
  try {
    return work();
  } catch (const std::exception& e) {
    reason = e.what();
  } catch (...) {
  }
  abort_job(comm, reason);
}

/// Throws config_error on every rank (the same message) unless every rank of
/// `comm` passed the same fingerprint (see distributed::fingerprint).
inline void require_same_model(MPI_Comm comm, std::uint64_t fp) {
  const int n = comm_size(comm);
  std::vector<std::uint64_t> all(static_cast<std::size_t>(n), 0);
  MPI_Allgather(&fp, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm);
  for (int r = 1; r < n; ++r)
    if (all[std::size_t(r)] != all[0])
      throw config_error(moeforge::detail::cat("expert parallel: rank ", r, "'s model or placement differs from rank 0's (fingerprint ",
                                               all[std::size_t(r)], " vs ", all[0],
                                               "): every rank must load the same model with the same placement"));
}

/// What the expert-parallel MoE layers cost this rank (summed over calls).
struct ep_stats {
  double compute = 0;      ///< seconds computing this rank's experts (and the replicated shared experts)
  double communicate = 0;  ///< seconds in MPI_Allgatherv, waiting for the slowest rank included
  double combine = 0;      ///< seconds summing the blocks and adding the compensation
  std::uint64_t bytes_sent = 0;  ///< this rank's blocks × the other ranks
  double work = 0;               ///< neuron products of this rank's routed experts (DualSparse's load unit)
  index_t layer_calls = 0;
};

namespace detail {

/// One rank's MoE layers and what running them cost; the transformer's
/// external MoE runner shares it, so the transformer can move freely.
class expert_layers {
 public:
  explicit expert_layers(MPI_Comm comm) : comm_(comm), rank_(comm_rank(comm)), ranks_(comm_size(comm)) {}

  /// Checks the model and placement across ranks and packs this rank's
  /// routed experts and the shared ones of every MoE layer; the transformer
  /// `layers` answers for keeps those layers' skeletons (routers, novices,
  /// compensation, expert shapes) and releases their plain experts.
  static model::transformer split(const std::shared_ptr<expert_layers>& layers, model::weights&& w, placement p,
                                  const std::optional<runtime::detail::weight_format>& format) {
    using moeforge::detail::cat;
    expert_layers& self = *layers;
    model::validate(w);
    validate(p, w);
    if (p.ranks != self.ranks_)
      throw config_error(cat("expert parallel: the placement is for ", p.ranks, " ranks, the job has ", self.ranks_));
    for (std::size_t li = 0; li < w.layers.size(); ++li)
      if (const auto* m = std::get_if<moe_layer>(&w.layers[li].ffn); m && m->router.kind == router_kind::oracle)
        throw config_error(cat("expert parallel: layer ", li, " has an oracle router, which needs every expert on every rank"));
    const runtime::detail::weight_format t = format.value_or(runtime::detail::weight_format(w.weight_dtype));
    require_same_model(self.comm_, fingerprint(w, p, t.type));
    model::transformer::external_moe external;
    external.layers.assign(w.layers.size(), false);
    self.packed_.resize(w.layers.size());
    for (std::size_t li = 0; li < w.layers.size(); ++li) {
      const auto* m = std::get_if<moe_layer>(&w.layers[li].ffn);
      if (!m) continue;
      external.layers[li] = true;
      auto& packed = self.packed_[li];
      // Other ranks' experts stay unpacked: the kernel reads only their shapes.
      for (std::size_t e = 0; e < m->experts.size(); ++e)
        packed.experts.push_back(p.owner[li][e] == self.rank_ || m->experts[e].is_novice() ? runtime::detail::pack_expert(*m, e, t)
                                                                                          : runtime::detail::packed_ffn{});
      for (const auto& sh : m->shared) packed.shared.push_back(runtime::detail::pack_ffn(sh.weights, {}, t));
    }
    self.placement_ = std::move(p);
    external.run = [layers](index_t li, const moe_layer& m, const runtime::selection& sel, const_matrix_ref x, matrix_ref y) {
      layers->run_layer(li, m, sel, x, y);
    };
    external.collective = true;
    return model::transformer(std::move(w), std::move(external), format);
  }

  using clock = std::chrono::steady_clock;
  static double since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }

  void run_layer(index_t li, const moe_layer& m, const runtime::selection& sel, const_matrix_ref x, matrix_ref y) {
    namespace rd = runtime::detail;
    // Collectives from several threads would pair different calls across
    // ranks; an exception cannot leave the OpenMP region, so the job ends here.
    if (omp_in_parallel())
      abort_job(comm_, "expert parallel: forward passes are collective and must run one at a time, not from parallel threads "
                       "(see transformer::collective())");
    const auto t0 = clock::now();
    rd::check_input(x, y, m.hidden(), "moe");
    const runtime::routing_plan plan = runtime::make_plan(m, sel, x);
    std::vector<rd::job> jobs = rd::make_jobs(m, &packed_[std::size_t(li)], plan, x);
    if (x.rows() == 0) return;
    const index_t hidden = m.hidden();
    // Who computes each job: -1 every rank (shared experts), -2 nobody
    // (novices, added from their vectors while summing; empty jobs).
    std::vector<int> owner(jobs.size(), -1);
    for (std::size_t k = m.shared.size(); k < jobs.size(); ++k)
      owner[k] = jobs[k].novice || jobs[k].tokens.empty() ? -2 : placement_.owner[std::size_t(li)][std::size_t(jobs[k].expert)];
    // Each rank's blocks in job order: the layout every rank derives from the same plan.
    std::vector<std::size_t> offset(jobs.size(), 0), count(static_cast<std::size_t>(ranks_), 0);
    std::size_t shared_size = 0;
    for (std::size_t k = 0; k < jobs.size(); ++k) {
      const std::size_t size = jobs[k].tokens.size() * std::size_t(hidden);
      if (owner[k] == -1) {
        offset[k] = shared_size;
        shared_size += size;
      } else if (owner[k] >= 0) {
        offset[k] = count[std::size_t(owner[k])];
        count[std::size_t(owner[k])] += size;
      }
    }
    std::vector<int> counts(static_cast<std::size_t>(ranks_)), displs(static_cast<std::size_t>(ranks_));
    std::size_t total = 0;
    for (int r = 0; r < ranks_; ++r) {
      if (count[std::size_t(r)] > std::size_t(INT_MAX) || total > std::size_t(INT_MAX))
        throw config_error(moeforge::detail::cat("expert parallel: layer ", li, "'s blocks exceed MPI's int count; feed fewer tokens at once"));
      counts[std::size_t(r)] = int(count[std::size_t(r)]);
      displs[std::size_t(r)] = int(total);
      total += count[std::size_t(r)];
    }
    blocks_.resize(total);
    shared_blocks_.resize(shared_size);
    rd::job_split split;
    split.computes.resize(jobs.size());
    split.part.resize(jobs.size());
    for (std::size_t k = 0; k < jobs.size(); ++k) {
      split.computes[k] = owner[k] == -1 || owner[k] == rank_;
      if (jobs[k].tokens.empty() || owner[k] == -2) continue;
      split.part[k] = owner[k] == -1 ? shared_blocks_.data() + offset[k] : blocks_.data() + std::size_t(displs[std::size_t(owner[k])]) + offset[k];
      if (owner[k] == rank_) stats.work += double(jobs[k].tokens.size()) * double(jobs[k].columns) * (jobs[k].gated() ? 3 : 2);
    }
    clock::time_point t2;
    split.exchange = [&] {
      const auto t1 = clock::now();
      stats.compute += std::chrono::duration<double>(t1 - t0).count();
      MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, blocks_.data(), counts.data(), displs.data(), MPI_FLOAT, comm_);
      stats.bytes_sent += std::uint64_t(count[std::size_t(rank_)]) * sizeof(float) * std::uint64_t(ranks_ - 1);
      t2 = clock::now();
      stats.communicate += std::chrono::duration<double>(t2 - t1).count();
    };
    rd::run_jobs(jobs, x, y, &split);
    runtime::add_compensation(m, plan, y);
    stats.combine += since(t2);
    ++stats.layer_calls;
  }

  const placement& layout() const { return placement_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  ep_stats stats;

 private:
  MPI_Comm comm_;
  int rank_, ranks_;
  placement placement_;
  std::vector<runtime::detail::packed_layer> packed_;  ///< per layer: this rank's experts' and the shared experts' panels (empty for a dense layer)
  std::vector<float> blocks_, shared_blocks_;          ///< the exchanged blocks, this call's; reused
};

}  // namespace detail

/// A model run with expert parallelism. Construct it on every rank of `comm`
/// with the same model and placement (checked: refused otherwise), inside
/// run_or_abort. model() is an ordinary owning transformer (eval, generate,
/// logits work on it, and take_model() hands it over); its forward passes are
/// collective (transformer::collective()): every rank must make the same calls
/// in the same order, one at a time (model::perplexity then runs its windows
/// one after another).
class expert_parallel {
 public:
  expert_parallel(model::weights&& w, placement p, MPI_Comm comm, std::optional<runtime::detail::weight_format> format = std::nullopt)
      : layers_(std::make_shared<detail::expert_layers>(comm)), tr_(detail::expert_layers::split(layers_, std::move(w), std::move(p), format)) {}

  const model::transformer& model() const { return tr_; }
  /// The transformer, still expert-parallel (its runner shares the layers),
  /// for callers that keep only it; this object's stats stay live.
  model::transformer take_model() { return std::move(tr_); }
  const placement& layout() const { return layers_->layout(); }
  int rank() const { return layers_->rank(); }
  int ranks() const { return layers_->ranks(); }
  const ep_stats& stats() const { return layers_->stats; }
  void reset_stats() { layers_->stats = {}; }

 private:
  std::shared_ptr<detail::expert_layers> layers_;
  model::transformer tr_;
};

}  // namespace moeforge::distributed
