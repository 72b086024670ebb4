// Options every model-running subcommand shares: --model, --config,
// --tokenizer (where text is read; default: see tokenizer_path), --threads.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <vector>
#include <string>

#include <omp.h>

#include "args.hpp"
#include "commands.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/model/tokenizer.hpp"
#if MOEFORGE_WITH_MPI
#include "moeforge/distributed/expert_parallel.hpp"
#endif

namespace moeforge::cli {

/// `config_flag` names the option giving a .safetensors model its config.json
/// ("config", or another name where --config means something else).
inline void add_model_options(args& a, bool needs_tokenizer, const char* config_flag = "config") {
  a.required("model", "PATH",
             std::string("a llama2.c .bin, a .safetensors file (config.json beside it, or --") + config_flag +
                 "), a Hugging Face directory or a moeforge model directory");
  a.option(config_flag, "FILE", "config.json of a .safetensors model (default: the one beside it)");
  if (needs_tokenizer)
    a.option("tokenizer", "FILE", "llama2.c tokenizer (default: tokenizer.bin, else tok512.bin, in a model directory; tok512.bin beside a model file)");
  a.option("threads", "N", "OpenMP threads (default: all cores)");
}

/// Applies --threads when given. More threads than this are a typo, and
/// OpenMP cannot start them.
inline void apply_threads(const args& a) {
  constexpr long long most_threads = 4096;
  if (a.has("threads")) omp_set_num_threads(int(a.get_int("threads", 1, most_threads)));
}

inline io::load_options load_options(const args& a, const char* config_flag = "config") {
  apply_threads(a);
  io::load_options o;
  if (a.has(config_flag)) o.config = a.get(config_flag);
  return o;
}

/// The model as plain F32 weights (for the commands that convert or export it).
inline model::weights load_model(const args& a, const char* config_flag = "config") { return io::load_model(a.get("model"), load_options(a, config_flag)); }

/// --dtype for the commands that run a model: the type its weights are kept
/// in for the kernels; and --expert-parallel, which load_transformer honours.
inline void add_dtype_option(args& a) {
  a.option("dtype", "auto|f32|bf16", "weight type the kernels read: auto = the model's default: the type the file stores its weight matrices in (F16 runs as F32; BF16 halves the bytes per token)", "auto");
  a.flag("expert-parallel",
         "under `mpirun -np N`: split the routed experts over the N processes (one thread each), each reading only its own "
         "experts and the replicated rest from the file; rank 0 prints");
  a.option("placement", "contiguous|balanced|FILE",
           "with --expert-parallel: experts in runs of consecutive indices, balanced by their load on --calibration, or a placement JSON file",
           "contiguous");
  a.option("calibration", "FILE",
           "with --placement balanced: the text whose routing loads balance the ranks (each rank runs it through each layer "
           "as the layer is read, so loading holds one whole layer in F32 beyond the rank's share)");
  a.option("shared-experts", "auto|once|replicated",
           "with --expert-parallel: each MoE layer's shared experts computed by its least loaded rank (once) or by every rank; "
           "auto = replicated (as fast as once here, fewer bytes; once saves the other ranks their memory)",
           "auto");
}

/// The weight type --dtype asks for; empty for `auto` (the type the model's file stores).
inline std::optional<dtype> requested_dtype(const args& a) {
  if (a.get("dtype") == "auto") return std::nullopt;
  return a.get_parsed("dtype", [](const std::string& v) { return parse_weight_dtype(v); });
}

inline std::string tokenizer_path(const args& a);
inline std::string read_text_file(const std::string& path);

/// --expert-parallel: this rank's share of the model (distributed/), with MPI
/// started here and finished at exit. Ranks other than 0 print nothing on
/// stdout. One OpenMP thread per rank (a --threads asking for more is refused):
/// the ranks share the machine's cores. From here on an error on any rank
/// ends the whole job (on_command_error): the others may be waiting for it
/// in a collective.
inline model::transformer load_expert_parallel(const args& a, const io::load_options& o, const std::function<void(index_t, model::layer&)>& on_layer) {
#if MOEFORGE_WITH_MPI
  static distributed::mpi_session mpi;
  if (a.has("threads") && a.get_int("threads", 1) != 1)
    throw usage_error("--expert-parallel runs one OpenMP thread per rank: drop --threads or pass --threads 1 (start more ranks instead)");
  omp_set_num_threads(1);
  // The options, checked alike on every rank before any waits for another:
  // a bad one ends each rank with the usage error's exit code (rank 0 says
  // why), not with an abort of the job.
  const std::string how = a.get("placement");
  distributed::placement_options p;
  try {
    if (how == "balanced" && !a.has("calibration"))
      throw usage_error("--placement balanced needs --calibration FILE (a text whose routing loads balance the ranks)");
    if (how != "balanced" && a.has("calibration")) throw usage_error("--calibration applies only to --placement balanced");
    if (a.get("shared-experts") != "auto") {
      if (how != "balanced" && how != "contiguous")
        throw usage_error("--shared-experts applies to contiguous and balanced placements; a placement FILE says where they run");
      p.shared = a.get_parsed("shared-experts", [](const std::string& v) { return distributed::parse_shared_experts(v); });
    }
  } catch (const usage_error&) {
    if (mpi.rank() != 0) std::exit(2);
    throw;
  }
  if (mpi.size() > 1) on_command_error = [](const std::string& reason) { distributed::abort_job(MPI_COMM_WORLD, reason); };
  if (mpi.rank() != 0 && !std::freopen("/dev/null", "w", stdout)) throw io_error("expert parallel: cannot silence stdout on a rank other than 0");
  return distributed::run_or_abort(MPI_COMM_WORLD, [&] {
    if (how == "balanced") {
      p.calibration = [&](const model::config& c) { return model::load_tokenizer(tokenizer_path(a), c.vocab_size).encode(read_text_file(a.get("calibration"))); };
    } else if (how != "contiguous") {
      p.given = distributed::load_placement(how);
      p.source = how;
    }
    io::load_options with_edits = o;
    with_edits.on_layer = on_layer;
    return distributed::expert_parallel(a.get("model"), with_edits, std::move(p), MPI_COMM_WORLD, requested_dtype(a)).take_model();
  });
#else
  (void)a, (void)o, (void)on_layer;
  throw usage_error("--expert-parallel: this moeforge was built without MPI (install libopenmpi-dev and reconfigure with -DMOEFORGE_WITH_MPI=ON)");
#endif
}

/// The model as an owning transformer running --dtype weights (add_dtype_option),
/// read one layer at a time: a BF16 model needs about its file size of memory
/// (see io::load_transformer). `on_layer` may edit each layer before it is packed.
inline model::transformer load_transformer(const args& a, std::function<void(index_t, model::layer&)> on_layer = {}) {
  io::load_options o = load_options(a);
  if (a.flag_set("expert-parallel")) return load_expert_parallel(a, o, on_layer);
  if (a.get("placement") != "contiguous" || a.has("calibration") || a.get("shared-experts") != "auto")
    throw usage_error("--placement, --calibration and --shared-experts need --expert-parallel");
  o.on_layer = std::move(on_layer);
  return io::load_transformer(a.get("model"), o, requested_dtype(a));
}

/// Where a model's own tokenizer is looked for, in order: tokenizer.bin
/// (what a converted directory carries) and tok512.bin in a model directory;
/// tok512.bin beside a model file.
inline std::vector<std::filesystem::path> tokenizer_places(const std::filesystem::path& model) {
  if (moeforge::detail::file_type_of(model.string(), "model") == std::filesystem::file_type::directory) return {model / "tokenizer.bin", model / "tok512.bin"};
  return {model.parent_path() / "tok512.bin"};
}

/// The first of tokenizer_places(model) that exists, if any.
inline std::optional<std::string> model_tokenizer(const std::filesystem::path& model) {
  for (const auto& p : tokenizer_places(model))
    if (moeforge::detail::file_type_of(p.string(), "tokenizer") != std::filesystem::file_type::not_found) return p.string();
  return std::nullopt;
}

/// --tokenizer, else the model's own (model_tokenizer). None beside a model
/// that exists is an io_error naming where it looked and --tokenizer: call
/// this before loading the model, to fail before that work.
inline std::string tokenizer_path(const args& a) {
  namespace fs = std::filesystem;
  if (a.has("tokenizer")) return a.get("tokenizer");
  const fs::path model(a.get("model"));
  if (const auto found = model_tokenizer(model)) return *found;
  if (moeforge::detail::file_type_of(model.string(), "model") == fs::file_type::not_found) return tokenizer_places(model).back().string();  // the loader reports the model
  std::string places;
  for (const auto& p : tokenizer_places(model)) places += (places.empty() ? "'" : " or '") + p.string() + "'";
  throw io_error("tokenizer: no " + places + ", where the tokenizer of --model " + model.string() + " is looked for; pass --tokenizer FILE");
}

inline std::string read_text_file(const std::string& path) {
  const std::vector<char> bytes = moeforge::detail::read_whole_file(path, "text file");
  return std::string(bytes.begin(), bytes.end());
}

}  // namespace moeforge::cli
