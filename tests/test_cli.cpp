// The real moeforge and moeforge-bench binaries, run as a user would: --help
// and --version, exit codes (0 success, 1 a bad file or model, 2 a bad command
// line), the --json outputs' keys and types, bad option values (exit 2, the
// option named, nothing written), the tokenizer travelling with a converted
// model, and --force / no-clobber. Built only with the tools.
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/io/load.hpp"
#include "moeforge/runtime/gemm.hpp"
#include "support/data.hpp"
#include "support/hf_checkpoint.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge::test;
namespace fs = std::filesystem;

namespace {

struct outcome {
  int code = -1;
  std::string out, err;
};

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

/// Runs `program args...` with stdout and stderr captured in files of `scratch`.
outcome run(const std::string& program, const std::vector<std::string>& args, const temp_dir& scratch) {
  std::string command = shell_quote(program);
  for (const auto& a : args) command += " " + shell_quote(a);
  command += " >" + shell_quote(scratch / "stdout") + " 2>" + shell_quote(scratch / "stderr") + " </dev/null";
  const int status = std::system(command.c_str());
  outcome o;
  o.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  o.out = file_bytes(scratch / "stdout");
  o.err = file_bytes(scratch / "stderr");
  return o;
}

outcome cli(const std::vector<std::string>& args, const temp_dir& scratch) { return run(MOEFORGE_CLI, args, scratch); }

std::string stories_model() { return data_file("models/stories260K/stories260K.bin"); }
std::string text(const std::string& name) { return data_file("data/" + name); }

/// The options of a cheap CMoE conversion of stories260K into `out`.
std::vector<std::string> convert_args(const std::string& out, const std::string& config = "S1A3E8") {
  return {"convert", "cmoe", "--model", stories_model(), "--calib", text("tinystories_calib.txt"), "--calib-tokens", "512",
          "--config", config, "--quiet", "--out", out};
}

/// A usage error: exit 2, the option named on stderr, nothing on stdout.
void require_usage_error(const outcome& o, const std::string& option) {
  INFO("stderr: " << o.err);
  REQUIRE(o.code == 2);
  REQUIRE(o.err.find(option) != std::string::npos);
  REQUIRE(o.out.empty());
}

/// Each key of `want` is in `j` with the given JSON type, and nothing else is.
void require_keys(const nlohmann::json& j, const std::map<std::string, nlohmann::json::value_t>& want) {
  INFO(j.dump().substr(0, 400));
  REQUIRE(j.is_object());
  REQUIRE(j.size() == want.size());
  for (const auto& [key, type] : want) {
    INFO("key " << key);
    REQUIRE(j.contains(key));
    // Integers are numbers too; a floating-point field may print as an integer when whole.
    const auto got = j[key].type();
    const bool same = got == type || (type == nlohmann::json::value_t::number_float && j[key].is_number());
    REQUIRE(same);
  }
}

using jt = nlohmann::json::value_t;

/// The rows a successful moeforge-bench run with `args` writes with --json.
nlohmann::json bench_rows(std::vector<std::string> args, const temp_dir& scratch) {
  const std::string json = scratch / "rows.json";
  args.insert(args.end(), {"--json", json});
  const auto o = run(MOEFORGE_BENCH, args, scratch);
  INFO(o.err);
  REQUIRE(o.code == 0);
  return read_json(json);
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

/// The names of the files in `dir` that start with `prefix` (a destination and any temporary beside it).
std::vector<std::string> files_starting(const fs::path& dir, const std::string& prefix) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind(prefix, 0) == 0) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_CASE("moeforge and moeforge-bench --version print the project version") {
  const temp_dir scratch;
  for (const std::string program : {MOEFORGE_CLI, MOEFORGE_BENCH}) {
    const auto o = run(program, {"--version"}, scratch);
    INFO(program);
    REQUIRE(o.code == 0);
    REQUIRE(o.out == fs::path(program).filename().string() + " " MOEFORGE_VERSION "\n");
  }
}

TEST_CASE("every subcommand's --help exits 0 and prints its usage on stdout") {
  const temp_dir scratch;
  const std::vector<std::vector<std::string>> cli_commands{{"generate"}, {"eval"}, {"logits"}, {"convert", "cmoe"},
                                                           {"sparsify", "dualsparse"}, {"prune", "mone"}, {"export"}};
  const std::vector<std::string> bench_commands{"ffn", "cmoe", "convert", "dualsparse", "mone", "model", "pipeline", "ep"};
  const auto check = [&](const std::string& program, const std::vector<std::string>& command) {
    auto args = command;
    args.push_back("--help");
    const auto o = run(program, args, scratch);
    std::string usage = "usage: " + fs::path(program).filename().string();
    for (const auto& c : command) usage += " " + c;
    INFO(usage);
    REQUIRE(o.code == 0);
    REQUIRE(o.out.rfind(usage + " [options]", 0) == 0);
    REQUIRE(o.out.find("--help") != std::string::npos);
    REQUIRE(o.err.empty());
  };
  for (const auto& c : cli_commands) check(MOEFORGE_CLI, c);
  for (const auto& c : bench_commands) check(MOEFORGE_BENCH, {c});
  // The command lists: --help on stdout with exit 0, no command on stderr with exit 2.
  for (const std::string program : {MOEFORGE_CLI, MOEFORGE_BENCH}) {
    const auto help = run(program, {"--help"}, scratch);
    REQUIRE(help.code == 0);
    REQUIRE(help.out.find("commands:") != std::string::npos);
    const auto none = run(program, {}, scratch);
    REQUIRE(none.code == 2);
    REQUIRE(none.err.find("commands:") != std::string::npos);
    REQUIRE(none.out.empty());
  }
}

TEST_CASE("exit codes: 0 on success, 2 on a bad command line, 1 on a bad file") {
  const temp_dir scratch;
  const auto ok = cli({"logits", "--model", stories_model(), "--tokens", "1,403,407"}, scratch);
  REQUIRE(ok.code == 0);
  REQUIRE(std::count(ok.out.begin(), ok.out.end(), '\n') == 3);  // one line per position

  require_usage_error(cli({"frobnicate"}, scratch), "frobnicate");
  require_usage_error(cli({"logits", "--model", stories_model(), "--tokens", "1", "--bogus", "3"}, scratch), "--bogus");
  // A command that never reads text has no tokenizer to be given.
  require_usage_error(cli({"export", "--model", stories_model(), "--out", scratch / "exported", "--tokenizer", data_file("models/stories260K/tok512.bin")}, scratch),
                      "--tokenizer");
  CHECK_FALSE(fs::exists(scratch / "exported"));
  require_usage_error(cli({"logits", "--tokens", "1"}, scratch), "--model");
  require_usage_error(cli({"logits", "--model", stories_model(), "--tokens"}, scratch), "--tokens");
  require_usage_error(cli({"logits", "--model", stories_model(), "--tokens", "1,x"}, scratch), "--tokens");
  require_usage_error(cli({"logits", "--model", stories_model(), "--tokens", "1", "--json=yes"}, scratch), "--json");
  require_usage_error(cli({"convert", "--model", stories_model()}, scratch), "moeforge convert");

  const std::string missing = (scratch.path() / "no-such-model.bin").string();
  const auto bad_file = cli({"logits", "--model", missing, "--tokens", "1"}, scratch);
  REQUIRE(bad_file.code == 1);
  REQUIRE(bad_file.err.find("no-such-model.bin") != std::string::npos);
  const auto bad_text = cli({"eval", "--model", stories_model(), "--text", missing}, scratch);
  REQUIRE(bad_text.code == 1);
  REQUIRE(bad_text.err.find("no-such-model.bin") != std::string::npos);
  // A directory where a file belongs (it opens as a stream, then fails its reads).
  const auto dir_text = cli({"eval", "--model", stories_model(), "--text", scratch.path().string()}, scratch);
  REQUIRE(dir_text.code == 1);
  REQUIRE(dir_text.err.find("is a directory") != std::string::npos);
  const auto dir_tokenizer = cli({"generate", "--model", stories_model(), "--tokenizer", scratch.path().string()}, scratch);
  REQUIRE(dir_tokenizer.code == 1);
  REQUIRE(dir_tokenizer.err.find("is a directory") != std::string::npos);
  const auto bad_token = cli({"logits", "--model", stories_model(), "--tokens", "1,600"}, scratch);
  REQUIRE(bad_token.code == 1);
  REQUIRE(bad_token.out.empty());
}

TEST_CASE("eval --json and logits --json print the documented keys with their types") {
  const temp_dir scratch;
  const auto eval = cli({"eval", "--model", stories_model(), "--text", text("tinystories_eval.txt"), "--ctx", "64", "--windows", "2",
                         "--decode-steps", "4", "--prefill-tokens", "16", "--json"},
                        scratch);
  REQUIRE(eval.code == 0);
  const auto e = nlohmann::json::parse(eval.out);
  require_keys(e, {{"ppl", jt::number_float},
                   {"nll", jt::number_float},
                   {"tokens", jt::number_unsigned},
                   {"predicted", jt::number_unsigned},
                   {"windows", jt::number_unsigned},
                   {"active_fraction", jt::number_float},
                   {"nominal_active_fraction", jt::number_float},
                   {"dtype", jt::string},
                   {"drop_rate", jt::number_float},
                   {"layer_drop_rate", jt::array},
                   {"seconds", jt::number_float},
                   {"prefill_tokens", jt::number_unsigned},
                   {"prefill_tok_s", jt::number_float},
                   {"throughput_tok_s", jt::number_float},
                   {"decode_tok_s", jt::number_float}});
  CHECK(e["windows"] == 2);
  CHECK(e["predicted"] == 2 * 63);
  CHECK(e["prefill_tokens"] == 16);
  CHECK(e["layer_drop_rate"].size() == 5);
  CHECK(e["drop_rate"] == 0);  // a dense model drops nothing
  CHECK(e["ppl"].get<double>() > 1.0);
  CHECK(e["dtype"] == "F32");  // auto: the llama2.c file stores FP32
  // --dtype bf16 runs the same model on BF16 weights: another type, nearly the same perplexity.
  const auto bf16 = cli({"eval", "--model", stories_model(), "--text", text("tinystories_eval.txt"), "--ctx", "64", "--windows", "2",
                         "--decode-steps", "4", "--prefill-tokens", "16", "--dtype", "bf16", "--json"},
                        scratch);
  REQUIRE(bf16.code == 0);
  const auto b = nlohmann::json::parse(bf16.out);
  CHECK(b["dtype"] == "BF16");
  CHECK(b["ppl"].get<double>() != e["ppl"].get<double>());
  CHECK(std::abs(b["ppl"].get<double>() / e["ppl"].get<double>() - 1) < 1e-2);

  const auto logits = cli({"logits", "--model", stories_model(), "--tokens", "1,403,407", "--json"}, scratch);
  REQUIRE(logits.code == 0);
  const auto l = nlohmann::json::parse(logits.out);
  require_keys(l, {{"tokens", jt::array}, {"logits", jt::array}});
  CHECK(l["tokens"] == nlohmann::json{1, 403, 407});
  REQUIRE(l["logits"].size() == 3);
  for (const auto& row : l["logits"]) {
    REQUIRE(row.size() == 512);
    REQUIRE(row[0].is_number_float());
  }
}

TEST_CASE("a bad option value is a usage error naming the option: exit 2, nothing written") {
  const temp_dir scratch;
  const std::vector<std::string> generate{"generate", "--model", stories_model()};
  const std::vector<std::pair<std::string, std::string>> bad_generate{
      {"--steps", "-5"}, {"--steps", "0"},  {"--steps", "abc"},    {"--temperature", "-1"}, {"--temperature", "nan"},
      {"--top-p", "0"},  {"--top-p", "1.5"}, {"--seed", "-1"},     {"--threads", "0"},      {"--steps", "12x"},
      {"--threads", "4294967297"}};
  for (const auto& [option, value] : bad_generate) {
    INFO(option << " " << value);
    auto args = generate;
    args.insert(args.end(), {option, value});
    require_usage_error(cli(args, scratch), option);
  }
  // A later repetition of an option wins, so each bad value replaces a cheap good one.
  const std::vector<std::string> eval{"eval", "--model", stories_model(), "--text", text("tinystories_eval.txt"),
                                      "--ctx", "64", "--windows", "1", "--decode-steps", "2", "--prefill-tokens", "8"};
  for (const std::string option : {"--ctx", "--windows", "--decode-steps", "--prefill-tokens"}) {
    INFO(option);
    auto args = eval;
    args.insert(args.end(), {option, "0"});
    require_usage_error(cli(args, scratch), option);
  }
  auto policy = eval;
  policy.insert(policy.end(), {"--policy", "bogus"});
  require_usage_error(cli(policy, scratch), "--policy");
  // Checked before the model loads: with a model that does not exist, each is
  // still a usage error naming its option.
  const std::vector<std::vector<std::string>> bad_eval{{"--ctx", "1"},
                                                       {"--decode-steps", "0"},
                                                       {"--threshold", "0.1"},
                                                       {"--margin", "0.1"},
                                                       {"--policy", "1t", "--threshold", "2"},
                                                       {"--policy", "2t", "--threshold", "nan"},
                                                       {"--policy", "2t", "--margin", "-0.5"}};
  for (const auto& extra : bad_eval) {
    const std::string option = extra[extra.size() - 2];
    INFO(extra.front() << " ... " << extra.back());
    std::vector<std::string> args{"eval", "--model", scratch / "no-such-model.bin", "--text", text("tinystories_eval.txt")};
    args.insert(args.end(), extra.begin(), extra.end());
    require_usage_error(cli(args, scratch), option);
  }
  // The MoE methods' options, each refused as a usage error naming it before the model (here missing) is read.
  const std::vector<std::pair<std::vector<std::string>, std::vector<std::string>>> bad_methods{
      {{"sparsify", "dualsparse"}, {"--metric", "zz"}},       {{"sparsify", "dualsparse"}, {"--policy", "bogus"}},
      {{"sparsify", "dualsparse"}, {"--scope", "bogus"}},     {{"sparsify", "dualsparse"}, {"--threshold", "2"}},
      {{"sparsify", "dualsparse"}, {"--margin", "1e300"}},    {{"sparsify", "dualsparse"}, {"--partition", "0"}},
      {{"sparsify", "dualsparse"}, {"--major-fraction", "2"}}, {{"sparsify", "dualsparse"}, {"--drop-rate", "1"}},
      {{"prune", "mone"}, {"--ratio", "1"}},                  {{"prune", "mone"}, {"--count", "-1"}},
      {{"prune", "mone"}, {"--ratio", "0.5", "--method", "bogus"}}, {{"prune", "mone"}, {"--ratio", "0.5", "--replace", "bogus"}},
      {{"prune", "mone"}, {"--ratio", "0.5", "--freq", "bogus"}}};
  for (const auto& [command, extra] : bad_methods) {
    const std::string option = extra[extra.size() - 2];
    INFO(command[0] << " " << option << " " << extra.back());
    std::vector<std::string> args = command;
    args.insert(args.end(), {"--model", scratch / "no-such-model", "--calib", text("tinystories_calib.txt"), "--out", scratch / "never"});
    args.insert(args.end(), extra.begin(), extra.end());
    require_usage_error(cli(args, scratch), option);
    REQUIRE_FALSE(fs::exists(scratch / "never"));
  }
  // A combination the library refuses is a bad command line too.
  require_usage_error(cli({"sparsify", "dualsparse", "--model", scratch / "no-such-model", "--calib", text("tinystories_calib.txt"), "--out",
                           scratch / "never", "--policy", "1t", "--threshold", "0.1", "--drop-rate", "0.2"},
                          scratch),
                      "moeforge sparsify dualsparse");
  auto long_ctx = eval;
  long_ctx.insert(long_ctx.end(), {"--ctx", "100000"});
  require_usage_error(cli(long_ctx, scratch), "--ctx");
  require_usage_error(cli({"logits", "--model", stories_model(), "--tokens", "1,4294967297"}, scratch), "--tokens");
  auto type = eval;
  type.insert(type.end(), {"--dtype", "f16"});
  require_usage_error(cli(type, scratch), "--dtype");
  // The transforming commands check their calibration options before writing anything.
  const std::string out = scratch / "model";
  for (const std::string option : {"--calib-tokens", "--ctx"}) {
    INFO(option);
    auto args = convert_args(out);
    args.insert(args.end(), {option, "0"});
    require_usage_error(cli(args, scratch), option);
    REQUIRE_FALSE(fs::exists(out));
  }
}

TEST_CASE("convert cmoe: --iterations sets param_cluster's k-means passes; --leftover drop warns only where neurons are left over") {
  const temp_dir scratch;
  const auto convert = [&](const std::string& name, std::vector<std::string> extra, const std::string& config) {
    auto args = convert_args(scratch / name, config);
    args.insert(args.end(), {"--preset", "paper"});
    args.insert(args.end(), extra.begin(), extra.end());
    const auto o = cli(args, scratch);
    INFO(o.err);
    REQUIRE(o.code == 0);
    return o;
  };
  convert("pc", {"--method", "param_cluster", "--iterations", "3"}, "S1A3E4");
  const auto step = read_json(scratch / "pc/moeforge.json")["provenance"]["conversion"];
  CHECK(step["cluster_iterations"] == 3);
  // stories260K's FFNs have 172 neurons: 8 experts leave 4 over, 4 experts none.
  CHECK(convert("e8", {"--leftover", "drop"}, "S1A3E8").err.find("no longer exact") != std::string::npos);
  CHECK(convert("e4", {"--leftover", "drop"}, "S1A3E4").err.find("no longer exact") == std::string::npos);
}

TEST_CASE("convert copies the tokenizer into its output, refuses to clobber it, and replaces it with --force") {
  const temp_dir scratch;
  const std::string out = scratch / "cmoe";
  const auto first = cli(convert_args(out), scratch);
  INFO(first.err);
  REQUIRE(first.code == 0);
  REQUIRE(file_bytes(out + "/tokenizer.bin") == file_bytes(data_file("models/stories260K/tok512.bin")));
  // The converted directory runs on its own: generate finds the tokenizer in it.
  const auto story = cli({"generate", "--model", out, "--steps", "24"}, scratch);
  REQUIRE(story.code == 0);
  REQUIRE(story.out.size() > 20);
  // So do its native and packed exports, which carry the tokenizer along.
  for (const char* format : {"native", "packed"}) {
    INFO(format);
    const std::string exported = scratch / (std::string("exported-") + format);
    REQUIRE(cli({"export", "--model", out, "--format", format, "--out", exported}, scratch).code == 0);
    CHECK(file_bytes(exported + "/tokenizer.bin") == file_bytes(data_file("models/stories260K/tok512.bin")));
    CHECK(cli({"generate", "--model", exported, "--steps", "24"}, scratch).out == story.out);
  }
  // An export of a llama2.c file takes the tok512.bin beside it; without it, eval says where it looked.
  const std::string plain = scratch / "plain";
  REQUIRE(cli({"export", "--model", stories_model(), "--format", "native", "--out", plain}, scratch).code == 0);
  CHECK(file_bytes(plain + "/tokenizer.bin") == file_bytes(data_file("models/stories260K/tok512.bin")));
  std::filesystem::remove(plain + "/tokenizer.bin");
  const auto no_tokenizer = cli({"eval", "--model", plain, "--text", data_file("data/tinystories_eval.txt")}, scratch);
  CHECK(no_tokenizer.code == 1);
  CHECK(no_tokenizer.err.find("no '" + plain + "/tokenizer.bin' or '" + plain + "/tok512.bin'") != std::string::npos);
  CHECK(no_tokenizer.err.find("pass --tokenizer") != std::string::npos);
  // A config file for a moeforge directory (which carries its own) is refused, not ignored.
  const auto with_config = cli({"logits", "--model", plain, "--config", scratch / "config.json", "--tokens", "1"}, scratch);
  CHECK(with_config.code == 1);
  CHECK(with_config.err.find("--config applies to safetensors models, not moeforge directories") != std::string::npos);

  const std::string manifest = file_bytes(out + "/moeforge.json");
  const auto again = cli(convert_args(out, "S2A4E8"), scratch);
  REQUIRE(again.code == 1);
  REQUIRE(again.err.find("already exists") != std::string::npos);
  REQUIRE(file_bytes(out + "/moeforge.json") == manifest);

  auto forced = convert_args(out, "S2A4E8");
  forced.push_back("--force");
  REQUIRE(cli(forced, scratch).code == 0);
  const auto j = nlohmann::json::parse(file_bytes(out + "/moeforge.json"));
  CHECK(j["provenance"]["conversion"]["config"] == "S2A4E8");
  CHECK(file_bytes(out + "/tokenizer.bin") == file_bytes(data_file("models/stories260K/tok512.bin")));

  // A model whose every FFN is already an MoE has nothing to convert: refused, nothing written.
  auto reconvert = convert_args(scratch / "twice");
  reconvert[3] = out;
  const auto twice = cli(reconvert, scratch);
  REQUIRE(twice.code == 1);
  REQUIRE(twice.err.find("already an MoE") != std::string::npos);
  CHECK(twice.err.find("moeforge: moeforge") == std::string::npos);  // one prefix, not two
  REQUIRE_FALSE(fs::exists(scratch / "twice"));
  // A layout the model cannot take is a usage error naming --config.
  require_usage_error(cli(convert_args(scratch / "bad", "S9A3E8"), scratch), "--config");
  REQUIRE_FALSE(fs::exists(scratch / "bad"));
}

TEST_CASE("sparsify and prune stream a sharded Hugging Face checkpoint to the model --in-memory writes, and refuse --scope global") {
  const temp_dir scratch;
  // Mixtral with the tokenizer's vocabulary, in BF16 for one command and F16
  // for the other: both paths store the conversion in the source's dtype.
  const std::vector<std::pair<std::vector<std::string>, moeforge::dtype>> commands{
      {{"sparsify", "dualsparse", "--partition", "2", "--metric", "b", "--policy", "2t", "--drop-rate", "0.2", "--scope", "layer"},
       moeforge::dtype::bf16},
      {{"prune", "mone", "--count", "1"}, moeforge::dtype::f16}};
  for (const auto& [command, type] : commands) {
    const std::string what = command.front() == "prune" ? "pruning" : "sparsification";
    CAPTURE(command[1]);
    // The BF16 source keeps its norms, routers and head in F32, as some checkpoints do.
    const bool mixed = type == moeforge::dtype::bf16;
    const std::string src = sharded_hf(scratch, std::string("mixtral-") + std::string(moeforge::dtype_name(type)), type, 3, {}, true, 512,
                                       mixed ? kept_in_f32 : std::function<bool(const std::string&)>());
    auto args = command;
    args.insert(args.end(), {"--model", src, "--tokenizer", data_file("models/stories260K/tok512.bin"), "--calib", text("tinystories_calib.txt"),
                             "--calib-tokens", "256", "--quiet"});
    auto streamed = args, in_memory = args;
    streamed.insert(streamed.end(), {"--out", scratch / "streamed"});
    in_memory.insert(in_memory.end(), {"--in-memory", "--out", scratch / "in-memory"});
    const auto s = cli(streamed, scratch);
    INFO(s.err);
    REQUIRE(s.code == 0);
    REQUIRE(s.out.find("streamed 3 of 3 layers") != std::string::npos);
    const auto m = cli(in_memory, scratch);
    INFO(m.err);
    REQUIRE(m.code == 0);
    const auto got = moeforge::io::load_model(scratch / "streamed"), want = moeforge::io::load_model(scratch / "in-memory");
    if (!mixed) CHECK(want.stored_dtype() == type);
    const auto in_f32 = [&](const std::string& name) { return mixed && (norm_or_head(name) || ends_with(name, ".moe.router.weight")); };
    for (const char* dir : {"streamed", "in-memory"}) check_stored_types(scratch / dir, type, in_f32);
    for (std::size_t l = 0; l < 3; ++l) CHECK(moeforge::io::detail::layer_json(got.layers[l]) == moeforge::io::detail::layer_json(want.layers[l]));
    const auto a = named_tensors(got), b = named_tensors(want);
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      CAPTURE(a[i].first);
      REQUIRE(a[i].first == b[i].first);
      CHECK(a[i].second == b[i].second);
    }
    // Both record the method the same way; the in-memory path adds its whole-model report.
    const auto ps = read_json(scratch / "streamed/moeforge.json")["provenance"][what], pm = read_json(scratch / "in-memory/moeforge.json")["provenance"][what];
    CHECK(ps["method"] == pm["method"]);
    CHECK(ps["options"] == pm["options"]);
    CHECK(pm.contains("report"));
    fs::remove_all(scratch / "streamed");
    fs::remove_all(scratch / "in-memory");
    if (mixed) {  // export keeps each tensor's type too, in either format
      const auto source = moeforge::io::load_model(src);
      for (const char* format : {"hf", "native"}) {
        CAPTURE(format);
        const auto e = cli({"export", "--model", src, "--format", format, "--out", scratch / "exported"}, scratch);
        INFO(e.err);
        REQUIRE(e.code == 0);
        const auto back = moeforge::io::load_model(scratch / "exported");
        CHECK(back.file_dtypes == source.file_dtypes);
        for (std::size_t l = 0; l < 3; ++l) CHECK(back.layers[l].file_dtypes == source.layers[l].file_dtypes);
        fs::remove_all(scratch / "exported");
      }
    }

    // The global choice needs every layer at once: a usage error naming --scope, before anything is written.
    auto global = args;
    global.insert(global.end(), {"--scope", "global", "--out", scratch / "global"});
    require_usage_error(cli(global, scratch), "--scope");
    REQUIRE_FALSE(fs::exists(scratch / "global"));
    REQUIRE_FALSE(fs::exists(scratch / ".global.partial"));
  }
}

TEST_CASE("export --format packed writes a directory that logits and eval run as the model it came from") {
  const temp_dir scratch;
  const std::string cmoe = scratch / "cmoe", packed = scratch / "packed";
  REQUIRE(cli(convert_args(cmoe), scratch).code == 0);
  const auto exported = cli({"export", "--model", cmoe, "--format", "packed", "--dtype", "bf16", "--out", packed}, scratch);
  INFO(exported.err);
  REQUIRE(exported.code == 0);
  CHECK(read_json(packed + "/moeforge.json")["panels"]["type"] == "BF16");
  const auto want = cli({"logits", "--model", cmoe, "--dtype", "bf16", "--tokens", "1,403,407,9", "--json"}, scratch);
  const auto got = cli({"logits", "--model", packed, "--tokens", "1,403,407,9", "--json"}, scratch);
  REQUIRE(want.code == 0);
  REQUIRE(got.code == 0);
  CHECK(nlohmann::json::parse(got.out) == nlohmann::json::parse(want.out));
  const std::vector<std::string> eval{"eval", "--text", text("tinystories_eval.txt"), "--ctx", "64", "--windows", "2",
                                      "--decode-steps", "2", "--prefill-tokens", "8", "--json", "--tokenizer",
                                      data_file("models/stories260K/tok512.bin"), "--model"};
  auto eval_of = [&](const std::string& model, std::vector<std::string> extra) {
    auto args = eval;
    args.push_back(model);
    args.insert(args.end(), extra.begin(), extra.end());
    const auto o = cli(args, scratch);
    INFO(o.err);
    REQUIRE(o.code == 0);
    return nlohmann::json::parse(o.out);
  };
  const auto e_packed = eval_of(packed, {}), e_cmoe = eval_of(cmoe, {"--dtype", "bf16"});
  CHECK(e_packed["dtype"] == "BF16");
  CHECK(e_packed["ppl"] == e_cmoe["ppl"]);
  // --dtype f32 on BF16 panels repacks them: the same values, computed in F32.
  CHECK(eval_of(packed, {"--dtype", "f32"})["dtype"] == "F32");

  require_usage_error(cli({"export", "--model", cmoe, "--format", "native", "--dtype", "bf16", "--out", scratch / "n"}, scratch), "--dtype");
  REQUIRE_FALSE(fs::exists(scratch / "n"));
}

TEST_CASE("moeforge-bench ffn times a row's types side by side: the BF16 row carries its times over the F32 row's") {
  const temp_dir scratch;
  const auto rows = bench_rows({"ffn", "--only-shapes", "--shape", "2048x8x64/2,E8A2", "--tokens", "1", "--dtype", "f32,bf16"}, scratch);
  REQUIRE(rows.size() == 4);
  const auto ms = [](const nlohmann::json& r, const char* key) { return r[key].get<double>(); };
  for (std::size_t shape = 0; shape < 2; ++shape) {
    const auto &f32 = rows[2 * shape], &bf16 = rows[2 * shape + 1];
    const bool split = shape == 1;  // E8A2 splits the dense layer and is compared with it
    INFO(f32["shape"]);
    CHECK(f32["dtype"] == "F32");
    CHECK(bf16["dtype"] == "BF16");
    CHECK_FALSE(f32.contains("moe_ms_over_f32"));
    REQUIRE(bf16.contains("moe_ms_over_f32"));
    CHECK(ms(bf16, "moe_ms_over_f32") == Approx(ms(bf16, "moe_ms") / ms(f32, "moe_ms")));
    CHECK(bf16.contains("dense_ms_over_f32") == split);
    if (split) CHECK(ms(bf16, "dense_ms_over_f32") == Approx(ms(bf16, "dense_ms") / ms(f32, "dense_ms")));
    for (const auto& r : {f32, bf16}) {
      CHECK(ms(r, "limit_ratio") == Approx(ms(r, "moe_ms") / ms(r, "limit_ms")));
      // Streaming and arithmetic one after the other: the sum of the two times whose larger is limit_ms.
      CHECK(ms(r, "serial_limit_ms") > ms(r, "limit_ms"));
      CHECK(ms(r, "serial_limit_ms") <= Approx(2 * ms(r, "limit_ms")));
      CHECK(ms(r, "serial_ratio") == Approx(ms(r, "moe_ms") / ms(r, "serial_limit_ms")));
      CHECK(r.contains("dense_ms") == split);
      if (split) CHECK(ms(r, "ideal_ratio") == Approx(ms(r, "limit_ms") / ms(r, "dense_limit_ms")));
      // The balance point's product, timed at the start against its own limit; BF16's needs vdpbf16ps. Its
      // value is loosely bounded: other work may share the machine while it runs (scripts/test's lanes), but a
      // limit in the wrong units would be off by orders of magnitude.
      const bool ridge = r["dtype"] == "F32" || moeforge::runtime::detail::bf16_dot_available;
      REQUIRE(r.contains("machine_ridge_ratio") == ridge);
      if (ridge) {
        CHECK(ms(r, "machine_ridge_ratio") > 0.2);
        // At least one token panel: MR tokens (F32), a BF16 pair panel's (fewer) when the peaks measured under load
        // put the balance below two of them.
        const int panel = r["dtype"] == "F32" ? int(moeforge::runtime::detail::gemm_mr) : int(moeforge::runtime::detail::gemm_pair_rows);
        CHECK(r["machine_ridge_tokens"].get<int>() >= panel);
        CHECK(r["machine_ridge_tokens"].get<int>() % panel == 0);
        CHECK(ms(r, "machine_ridge_overlap") >= 0);
        CHECK(ms(r, "machine_ridge_overlap") <= 1);
      }
    }
  }
  // E8A2 has no shared expert, so no shared width either.
  CHECK(rows[2]["shared"] == 0);
  CHECK(rows[2]["shared_width"] == 0);
  for (const auto& r : rows) CHECK(r["machine_bf16_gflops"].is_number());
  // Without a BF16 row there is no BF16 peak to report (it used to repeat the FP32 peak under BF16's name).
  const std::string f32_json = scratch / "f32.json";
  const auto f32_only = run(MOEFORGE_BENCH, {"ffn", "--only-shapes", "--shape", "2048x8x64/2", "--tokens", "1", "--dtype", "f32", "--json", f32_json}, scratch);
  INFO(f32_only.err);
  REQUIRE(f32_only.code == 0);
  CHECK(f32_only.out.find("BF16 peak") == std::string::npos);
  const auto f32_rows = read_json(f32_json);
  REQUIRE(f32_rows.size() == 1);
  CHECK(f32_rows[0]["machine_bf16_gflops"].is_null());
  CHECK(f32_rows[0]["machine_fp32_gflops"].get<double>() > 0);
  require_usage_error(run(MOEFORGE_BENCH, {"ffn", "--dtype", "bf16,f32,bf16"}, scratch), "--dtype");
  // A --json path it cannot write fails before anything is measured, not after.
  const auto unwritable = run(MOEFORGE_BENCH, {"ffn", "--only-shapes", "--shape", "2048x8x64/2", "--tokens", "1", "--json", scratch / "no/rows.json"},
                              scratch);
  CHECK(unwritable.code == 1);
  CHECK_THAT(unwritable.err, Catch::Contains("cannot write") && Catch::Contains("rows.json.tmp"));
  CHECK(unwritable.out.empty());
}

TEST_CASE("moeforge-bench model writes a row per layout and type, its decode judged against the bandwidth and the dense model measured beside it") {
  const temp_dir scratch;
  const auto rows = bench_rows({"model", "--shape", "tiny", "--layers", "1", "--moe", "S1A1E4", "--dtype", "f32", "--context", "64",
                                "--decode-steps", "2", "--rounds", "2"},
                               scratch);
  REQUIRE(rows.size() == 2);
  CHECK(rows[0]["moe"] == "none");
  CHECK(rows[1]["moe"] == "S1A1E4");
  for (const auto& r : rows) {
    for (const char* key : {"load_s", "rss_mb", "prefill64_tok_s", "prefill512_tok_s", "decode_tok_s", "bytes_per_token", "machine_gbs"})
      CHECK(r[key].get<double>() > 0);
    const double fraction = r["bytes_per_token"].get<double>() * r["decode_tok_s"].get<double>() / 1e9 / r["machine_gbs"].get<double>();
    CHECK(r["decode_bandwidth_fraction"].get<double>() == Approx(fraction).epsilon(1e-9));
    CHECK(r["rounds"] == 2);
  }
  // The tiny dense model stays resident, so the CMoE row's decode is compared with it in the same rounds.
  CHECK_FALSE(rows[0].contains("decode_vs_dense"));
  REQUIRE(rows[1].contains("decode_vs_dense"));
  CHECK(rows[1]["dense_decode_tok_s"].get<double>() > 0);
  CHECK(rows[1]["decode_vs_dense"].get<double>() == Approx(rows[1]["decode_tok_s"].get<double>() / rows[1]["dense_decode_tok_s"].get<double>()));
  require_usage_error(run(MOEFORGE_BENCH, {"model", "--shape", "tiny", "--rounds", "0"}, scratch), "--rounds");
  // The keys keep the default's name whatever --context is; --help says so.
  CHECK(rows[0]["prefill_long_tokens"] == 64);
  CHECK(rows[0]["decode_long_context"] == 64);
  const auto help = run(MOEFORGE_BENCH, {"model", "--help"}, scratch);
  CHECK(help.out.find("prefill512_tok_s") != std::string::npos);
  CHECK(help.out.find("decode_ctx512_tok_s") != std::string::npos);
}

TEST_CASE("moeforge-bench convert writes its row to --json FILE, as the other benchmarks do, and still prints its table") {
  const temp_dir scratch;
  const std::vector<std::string> args{"convert", "--hidden", "64", "--intermediate", "64", "--tokens", "64", "--config", "S1A1E4",
                                      "--preset", "best", "--no-peak"};
  const auto rows = bench_rows(args, scratch);
  REQUIRE(rows.size() == 1);
  const auto& r = rows[0];
  CHECK(r["config"] == "S1A1E4");
  CHECK(r["preset"] == "best");
  CHECK(r["hidden"] == 64);
  CHECK(r["seconds"].get<double>() > 0);
  CHECK(r["paper"]["preset"] == "paper");
  CHECK(r["time_vs_paper"].get<double>() == Approx(r["seconds"].get<double>() / r["paper"]["seconds"].get<double>()));
  CHECK_FALSE(r.contains("fma_peak_gflop_s"));  // --no-peak
  const auto table = run(MOEFORGE_BENCH, args, scratch);
  REQUIRE(table.code == 0);
  CHECK_THAT(table.out, Catch::Contains("convert S1A1E4 H=64") && Catch::Contains("best / paper: time"));
}

TEST_CASE("moeforge-bench checks every option before it loads, measures or writes anything — exit 2 naming the option") {
  const temp_dir scratch;
  // stories260K's benchmarks get a data directory that does not exist: an
  // option checked only after loading would fail there instead (exit 1).
  const std::string no_data = scratch / "no-data";
  const std::vector<std::string> dualsparse{"dualsparse", "--data", no_data}, model{"model", "--shape", "tiny", "--layers", "1", "--dtype", "f32",
                                                                                       "--context", "64", "--decode-steps", "2", "--rounds", "1"};
  // Small sizes, so that a check that came too late would cost seconds, not minutes.
  const std::vector<std::string> convert{"convert", "--hidden", "64", "--intermediate", "64", "--tokens", "64", "--no-peak"};
  const std::vector<std::string> convert_model{"convert-model", "--shape", "tiny", "--layers", "1", "--config", "S1A1E4", "--calib-tokens", "64",
                                               "--ctx", "64", "--shards", "1", "--tmp", scratch / "convert-tmp"};
  const std::vector<std::string> ffn{"ffn", "--only-shapes", "--shape", "2048x8x64/2", "--tokens", "1", "--dtype", "f32"};
  const auto stories = [&](const char* command) { return std::vector<std::string>{command, "--data", no_data}; };
  const std::vector<std::pair<std::vector<std::string>, std::vector<std::string>>> bad{
      {dualsparse, {"--tokens", "0"}},
      {dualsparse, {"--tokens", "-1"}},
      {dualsparse, {"--tokens", "abc"}},
      {dualsparse, {"--tokens", "1,100000"}},
      {dualsparse, {"--drop-rates", "abc"}},
      {dualsparse, {"--drop-rates", "0.1x"}},
      {dualsparse, {"--drop-rates", "0,1"}},
      {dualsparse, {"--policies", "bogus"}},
      {dualsparse, {"--policies", "none"}},
      {dualsparse, {"--configs", "BAD"}},
      {dualsparse, {"--calib-tokens", "0"}},
      {dualsparse, {"--eval-windows", "-1"}},
      {dualsparse, {"--reps", "0"}},
      {dualsparse, {"--sigma", "0"}},
      {model, {"--shape", "nosuch"}},
      {model, {"--moe", "S1A1E4,BAD"}},
      {model, {"--moe", "S9A1E4"}},
      {model, {"--shape", "mixtral-mini", "--moe", "S1A1E4"}},
      {model, {"--context", "100000000000"}},
      {model, {"--context", "63"}},
      {model, {"--decode-steps", "0"}},
      {model, {"--seed", "x"}},
      {convert, {"--config", "BAD"}},
      {convert, {"--config", "S1A1E99"}},
      {convert, {"--preset", "bad"}},
      {convert, {"--ka", "0"}},
      {convert_model, {"--threads", "abc"}},
      {convert_model, {"--threads", "0"}},
      {convert_model, {"--dtype", "f16"}},
      {ffn, {"--shape", "2048x8x64/2junk"}},
      {ffn, {"--shape", "2048x8x64/2+"}},
      {ffn, {"--shape", "2048x1000000000000x64/1"}},
      {ffn, {"--tokens", "0"}},
      {ffn, {"--threads", "-1"}},
      {stories("cmoe"), {"--calib-tokens", "0"}},
      {stories("cmoe"), {"--eval-windows", "-3"}},
      {stories("cmoe"), {"--decode-steps", "-4"}},
      {stories("mone"), {"--configs", "BAD"}},
      {stories("mone"), {"--replacements", "bogus"}},
      {stories("mone"), {"--calib-tokens", "0"}},
      {stories("pipeline"), {"--drop-rate", "abc"}},
      {stories("pipeline"), {"--prune-ratio", "1"}},
      {stories("pipeline"), {"--configs", "S1A3E8,BAD"}},
      {stories("pipeline"), {"--calib-tokens", "0"}},
      {stories("pipeline"), {"--eval-windows", "-3"}},
      {stories("pipeline"), {"--decode-steps", "-4"}},
  };
  for (const auto& [command, extra] : bad) {
    const std::string option = extra[extra.size() - 2];
    INFO(command[0] << " " << option << " " << extra.back());
    auto args = command;
    args.insert(args.end(), extra.begin(), extra.end());
    args.insert(args.end(), {"--json", scratch / "never.json"});
    require_usage_error(run(MOEFORGE_BENCH, args, scratch), option);
    REQUIRE(files_starting(scratch.path(), "never.json").empty());
    REQUIRE_FALSE(fs::exists(scratch / "convert-tmp"));
  }
}

TEST_CASE("moeforge-bench --json: a destination that is not a file is refused before the run; no file but the destination is ever touched") {
  const temp_dir scratch;
  const std::vector<std::string> model{"model", "--shape", "tiny", "--layers", "1", "--moe", "", "--dtype", "f32",
                                       "--context", "64", "--decode-steps", "2", "--rounds", "1", "--json"};
  // A directory: refused at the start (it used to fail at the rename, after the run, leaving DIR.tmp).
  fs::create_directory(scratch / "adir");
  auto args = model;
  args.push_back(scratch / "adir");
  const auto dir = run(MOEFORGE_BENCH, args, scratch);
  CHECK(dir.code == 1);
  CHECK_THAT(dir.err, Catch::Contains("adir") && Catch::Contains("not a regular file"));
  CHECK(dir.out.empty());
  CHECK(fs::is_directory(scratch / "adir"));
  CHECK(files_starting(scratch.path(), "adir") == std::vector<std::string>{"adir"});

  // A user's FILE.tmp is neither the probe's nor the writer's temporary, and
  // a failed run leaves an existing FILE as it was.
  const std::string rows = scratch / "r.json", theirs = scratch / "r.json.tmp";
  write_text(theirs, "user data");
  write_text(rows, "previous rows");
  const auto failed = run(MOEFORGE_BENCH, {"model", "--shape", "tiny", "--rounds", "0", "--json", rows}, scratch);
  CHECK(failed.code == 2);
  CHECK(file_bytes(theirs) == "user data");
  CHECK(file_bytes(rows) == "previous rows");
  args = model;
  args.push_back(rows);
  const auto ok = run(MOEFORGE_BENCH, args, scratch);
  INFO(ok.err);
  REQUIRE(ok.code == 0);
  CHECK(read_json(rows).size() == 1);
  CHECK(file_bytes(theirs) == "user data");
  CHECK(files_starting(scratch.path(), "r.json") == std::vector<std::string>{"r.json", "r.json.tmp"});
}
