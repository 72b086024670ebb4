// Expert parallelism over MPI: one model run by several processes (ranks),
// each holding only its share of the routed experts (see placement.hpp).
//
// Every rank reads from the model's file only its own routed experts and the
// replicated parts (embedding, attention, norms, routers, shared experts,
// novices, the head), and runs the replicated parts on the same tokens:
// deterministic, no communication. Each layer's shared experts are computed
// by every rank or, placed once, by one rank whose blocks carry them. In
// each MoE layer a rank computes its experts' down products, unscaled, for the tokens routed to them, one block per kernel job;
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
#include <exception>
#include <cstdint>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moeforge/distributed/placement.hpp"
#include "moeforge/io/load.hpp"
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

/// Runs `load` (this rank's part of building a model) on every rank of
/// `comm`, then agrees on failure before any further collective: a rank
/// whose load threw rethrows its own error, every other rank throws
/// config_error naming the lowest failing rank, so a read error on one rank
/// (a missing path, a NaN in one rank's expert) cannot leave the others
/// waiting in require_same_model.
template <class Load>
auto load_on_every_rank(MPI_Comm comm, Load&& load) -> decltype(load()) {
  std::optional<decltype(load())> result;
  std::exception_ptr failure;
  try {
    result.emplace(load());
  } catch (...) {
    failure = std::current_exception();
  }
  int failed = failure ? comm_rank(comm) : INT_MAX;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MIN, comm);
  if (failure) std::rethrow_exception(failure);
  if (failed != INT_MAX)
    throw config_error(moeforge::detail::cat("expert parallel: rank ", failed, " of ", comm_size(comm),
                                             " failed to load the model (its own error says why); every rank stops"));
  return std::move(*result);
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

/// How a model read layer by layer is placed. Each layer's experts are
/// placed before its experts are read (a rank reads only its own): from
/// `given`, or contiguously, or (with `calibration`) balanced by the loads
/// the calibration tokens put on that layer's experts, which needs the layer
/// whole for as long as the tokens run through it (one layer in F32 beyond
/// the rank's share), the tokens' hidden states advancing layer by layer.
struct placement_options {
  std::optional<placement> given;  ///< a placement made beforehand (a file)
  std::string source = {};         ///< where `given` came from (load_placement's path), named in errors
  /// Balanced placement: the calibration tokens, given the model's config
  /// (for the tokenizer's vocabulary); empty: contiguous.
  std::function<std::vector<std::int32_t>(const model::config&)> calibration = {};
  shared_experts shared = default_shared_experts;  ///< without `given`
};

namespace detail {

/// One rank's MoE layers and what running them cost; the transformer's
/// external MoE runner shares it, so the transformer can move freely.
class expert_layers {
 public:
  explicit expert_layers(MPI_Comm comm) : comm_(comm), rank_(comm_rank(comm)), ranks_(comm_size(comm)) {}

  /// Builds this rank's transformer from `src` (a layer reader, see
  /// io::with_layer_reader) one layer at a time: each MoE layer is placed
  /// (see placement_options), read with only this rank's routed experts
  /// (the others released, their data unread), its own experts and the
  /// shared ones it computes packed here, and handed to the transformer as a
  /// skeleton (routers, novices, compensation, expert shapes) whose MoE
  /// `layers` runs. The fingerprint of the model and placement is hashed as
  /// the layers arrive (fingerprint()); the caller compares it across ranks.
  template <class Reader>
  static model::transformer build(const std::shared_ptr<expert_layers>& layers, Reader& src, const std::string& model_name,
                                  const placement_options& how, const std::optional<runtime::detail::weight_format>& format,
                                  const std::function<void(index_t, model::layer&)>& on_layer = {}) {
    using moeforge::detail::cat;
    expert_layers& self = *layers;
    model::weights globals = src.globals();
    src.release();
    model::validate_globals(globals);  // the calibration reads the embedding
    const model::config c = globals.config;
    if (how.given && (how.calibration || how.shared != default_shared_experts))
      throw config_error("expert parallel: placement_options sets both a given placement and calibration or shared, "
                         "which only a placement made while loading uses; set one or the other");
    const std::string what = cat("expert parallel: placement", how.source.empty() ? "" : cat(" '", how.source, "'"), " of model ", model_name);
    if (how.given && how.given->ranks != self.ranks_)
      throw config_error(cat(what, ": made for ", how.given->ranks, " ranks, the job has ", self.ranks_));
    if (how.given && index_t(how.given->owner.size()) != c.n_layers)
      throw config_error(cat(what, ": ", how.given->owner.size(), " layers, the model has ", c.n_layers));
    if (how.given && !how.given->shared_owner.empty() && how.given->shared_owner.size() != how.given->owner.size())
      throw config_error(cat(what, ": shared_owner lists ", how.given->shared_owner.size(), " layers, the model has ", c.n_layers));
    const runtime::detail::weight_format t = format.value_or(runtime::detail::weight_format(globals.run_dtype()));
    fingerprint_builder fp;
    fp.globals(globals, t);
    std::optional<layer_loads> loads;
    if (!how.given && how.calibration) loads.emplace(globals, how.calibration(c));
    placement p{self.ranks_, {}, {}};
    model::transformer::external_moe external;
    external.collective = true;
    for (index_t li = 0; li < c.n_layers; ++li) external.layers.push_back(src.experts(li) > 0);
    external.run = [layers](index_t li, const moe_layer& m, const runtime::selection& sel, const_matrix_ref x, matrix_ref y) {
      layers->run_layer(li, m, sel, x, y);
    };
    self.packed_.resize(std::size_t(c.n_layers));
    moeforge::detail::matrix_pool pool;  // each layer is read into the storage of the one packed before it
    model::transformer tr(
        std::move(globals),
        [&](index_t li) {
          const std::size_t i = std::size_t(li);
          const index_t experts = src.experts(li);
          std::vector<int> owner = how.given ? how.given->owner[i] : loads ? std::vector<int>() : contiguous_owners(experts, self.ranks_);
          if (!loads) validate_layer(owner, -1, self.ranks_, i, std::size_t(experts), 0, what);  // before any expert is read
          model::layer l =
              loads ? src.layer(li, {}, &pool) : src.layer(li, [&](index_t e) { return owner[std::size_t(e)] == self.rank_; }, &pool);
          pool.clear();
          src.release();  // the layer's mapped pages would otherwise stay resident
          if (on_layer) on_layer(li, l);
          model::validate(c, l, i, true);
          std::vector<double> load;
          if (loads) load = loads->next(l);
          auto* m = std::get_if<moe_layer>(&l.ffn);
          if (loads) owner = balanced_owners(load, self.ranks_);
          const std::size_t shared = m ? m->shared.size() : 0;
          const int shared_owner = how.given ? how.given->shared_of(i) : shared_owner_of(i, owner, load, self.ranks_, shared, how.shared);
          validate_layer(owner, shared_owner, self.ranks_, i, m ? m->experts.size() : 0, shared, what);
          p.owner.push_back(std::move(owner));
          p.shared_owner.push_back(shared_owner);
          fp.layer(l);
          if (m) self.keep(li, *m, p, t, pool);
          return l;
        },
        format, std::move(external), pool.sink());
    self.fingerprint_ = fp.finish(p);  // compared by the caller once every rank has loaded (load_on_every_rank)
    self.placement_ = std::move(p);
    return tr;
  }

  /// Packs MoE layer li's experts this rank computes (its routed ones,
  /// the novices, the shared ones unless another rank computes them) and
  /// releases every routed expert's plain weights: the kernel reads only the
  /// shapes of the experts other ranks compute. Only those may arrive
  /// released (an on_layer edit could release more): packing an empty FFN
  /// would compute zeros where the single-process run computes the expert.
  void keep(index_t li, moe_layer& m, const placement& p, runtime::detail::weight_format t, moeforge::detail::matrix_pool& pool) {
    using moeforge::detail::cat;
    if (m.router.kind == router_kind::oracle)
      throw config_error(cat("expert parallel: layer ", li, " has an oracle router, which needs every expert on every rank"));
    const std::size_t i = std::size_t(li);
    auto& packed = packed_[i];
    for (std::size_t e = 0; e < m.experts.size(); ++e) {
      const bool novice = m.experts[e].is_novice();
      const bool own = p.owner[i][e] == rank_ || novice;
      if (own && !novice) require_held(m.experts[e].weights, cat("expert parallel: layer ", li, " expert ", e, " (computed by rank ", rank_, ")"));
      packed.experts.push_back(own ? runtime::detail::pack_expert(m, e, t) : runtime::detail::packed_ffn{});
      if (!novice) release(m.experts[e].weights, pool.sink());
    }
    const int shared = p.shared_of(i);
    for (std::size_t s = 0; s < m.shared.size(); ++s) {
      const bool computes = shared == -1 || shared == rank_;
      if (computes) require_held(m.shared[s].weights, cat("expert parallel: layer ", li, " shared expert ", s, " (computed by rank ", rank_, ")"));
      packed.shared.push_back(computes ? runtime::detail::pack_ffn(m.shared[s].weights, {}, t) : runtime::detail::packed_ffn{});
    }
  }

  /// Whether this rank holds routed expert e of layer li / layer li's shared experts (their panels).
  bool holds_expert(index_t li, index_t e) const {
    if (li < 0 || std::size_t(li) >= packed_.size() || e < 0 || std::size_t(e) >= packed_[std::size_t(li)].experts.size())
      throw config_error(moeforge::detail::cat("expert parallel: holds_expert(layer ", li, ", expert ", e, "): no such MoE layer or expert (",
                                               packed_.size(), " layers; a dense layer has no experts)"));
    return packed_[std::size_t(li)].experts[std::size_t(e)].down.rows() != 0;
  }
  bool computes_shared(index_t li) const {
    const auto& shared = packed_[std::size_t(li)].shared;
    return !shared.empty() && shared.front().down.rows() != 0;
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
    // Who computes each job: -1 every rank (replicated shared experts), -2
    // nobody (novices, added from their vectors while summing; empty jobs).
    // Shared experts computed once travel in their rank's blocks, in job order.
    std::vector<int> owner(jobs.size(), placement_.shared_of(std::size_t(li)));
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
    require_same_routing(li, x.rows(), count);
    blocks_.resize(total);
    shared_blocks_.resize(shared_size);
    rd::job_split split;
    split.computes.resize(jobs.size());
    split.part.resize(jobs.size());
    for (std::size_t k = 0; k < jobs.size(); ++k) {
      split.computes[k] = owner[k] == -1 || owner[k] == rank_;
      if (jobs[k].tokens.empty() || owner[k] == -2) continue;
      split.part[k] = owner[k] == -1 ? shared_blocks_.data() + offset[k] : blocks_.data() + std::size_t(displs[std::size_t(owner[k])]) + offset[k];
      if (owner[k] == rank_ && k >= m.shared.size()) stats.work += double(jobs[k].tokens.size()) * double(jobs[k].columns) * (jobs[k].gated() ? 3 : 2);
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

  /// Throws config_error on every rank unless all of them routed the same
  /// tokens to the same ranks' experts in this layer call: inputs that
  /// differ between ranks (each read its own --text) would make MPI's
  /// exchange fail or, with sizes that happen to agree, sum wrong blocks.
  /// One collective: the maximum of the hash and of its complement gives
  /// every rank the largest and the smallest hash.
  void require_same_routing(index_t li, index_t tokens, const std::vector<std::size_t>& count) const {
    detail::fingerprint_hash h;
    h.value(std::int64_t(li));
    h.value(std::int64_t(tokens));
    for (const std::size_t c : count) h.value(std::uint64_t(c));
    const std::uint64_t mine[2] = {h.get(), ~h.get()};
    std::uint64_t most[2];
    MPI_Allreduce(mine, most, 2, MPI_UINT64_T, MPI_MAX, comm_);
    if (most[0] != h.get() || ~most[1] != h.get())
      throw config_error(moeforge::detail::cat("expert parallel: layer ", li, ": the ranks routed different tokens (each must run the same "
                                               "inputs through the same calls: the same text, prompt and options)"));
  }

  const placement& layout() const { return placement_; }
  std::uint64_t fingerprint() const { return fingerprint_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  ep_stats stats;

 private:
  MPI_Comm comm_;
  int rank_, ranks_;
  placement placement_;
  std::uint64_t fingerprint_ = 0;  ///< of the model and placement, set by build
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
  /// From weights in memory (every rank holds them all until each layer is
  /// taken: what tests and callers that already have the weights use).
  expert_parallel(model::weights&& w, placement p, MPI_Comm comm, std::optional<runtime::detail::weight_format> format = std::nullopt)
      : layers_(std::make_shared<detail::expert_layers>(comm)),
        tr_(checked(comm, [&] { return from_weights(std::move(w), std::move(p), format); })) {}

  /// Reads the model at `path` (any model io::load_transformer reads) one
  /// layer at a time, each rank only its own routed experts (and the
  /// replicated rest), placed as `how` says; `opt.on_layer` may edit each
  /// layer (whose other ranks' experts are released) before it is packed.
  /// Peak memory per rank: its share of the model packed, plus one layer's
  /// replicated tensors and its own experts in F32 (the whole layer in F32
  /// with balanced placement), plus the file's mapped pages of that layer.
  expert_parallel(const std::string& path, const io::load_options& opt, placement_options how, MPI_Comm comm,
                  std::optional<runtime::detail::weight_format> format = std::nullopt)
      : layers_(std::make_shared<detail::expert_layers>(comm)),
        tr_(checked(comm, [&] {
          return io::with_layer_reader(path, opt, [&](auto&& src) { return detail::expert_layers::build(layers_, src, "'" + path + "'", how, format, opt.on_layer); });
        })) {}

  const model::transformer& model() const { return tr_; }
  /// The transformer, still expert-parallel (its runner shares the layers),
  /// for callers that keep only it; this object's stats stay live.
  model::transformer take_model() { return std::move(tr_); }
  const placement& layout() const { return layers_->layout(); }
  int rank() const { return layers_->rank(); }
  int ranks() const { return layers_->ranks(); }
  const ep_stats& stats() const { return layers_->stats; }
  /// Whether this rank holds routed expert e of MoE layer li (its packed weights).
  bool holds_expert(index_t li, index_t e) const { return layers_->holds_expert(li, e); }
  /// Whether this rank computes MoE layer li's shared experts.
  bool computes_shared(index_t li) const { return layers_->computes_shared(li); }
  void reset_stats() { layers_->stats = {}; }

 private:
  model::transformer from_weights(model::weights&& w, placement p, const std::optional<runtime::detail::weight_format>& format) {
    model::validate(w);
    validate(p, w);
    io::weights_layers src(std::move(w));
    return detail::expert_layers::build(layers_, src, "(weights in memory)", {std::move(p)}, format);
  }

  /// Loads on every rank, agreeing on failure, then on the model (see load_on_every_rank).
  template <class Load>
  model::transformer checked(MPI_Comm comm, Load&& load) {
    model::transformer tr = load_on_every_rank(comm, std::forward<Load>(load));
    require_same_model(comm, layers_->fingerprint());
    return tr;
  }

  std::shared_ptr<detail::expert_layers> layers_;
  model::transformer tr_;
};

}  // namespace moeforge::distributed
