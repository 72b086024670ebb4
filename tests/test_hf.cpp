// Hugging Face checkpoints: the Qwen2-MoE block reproduces its independent
// reference output, Mixtral loads identically from both expert layouts, the
// real stories260K exported to LLaMA's layout (half-split RoPE) runs exactly
// as the llama2.c checkpoint does, and every malformed input fails by name.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "moeforge/convert/partition.hpp"
#include "moeforge/io/hf.hpp"
#include "moeforge/io/load.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "support/hf_checkpoint.hpp"
#include "support/hf_dir_builder.hpp"
#include "support/random.hpp"
#include "support/stories.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;

namespace {

const std::vector<std::int32_t> probe_tokens{1, 7, 30, 2, 45, 11, 11, 0, 19, 33};

std::string mixtral_file() { return data_file("fixtures/hf/mixtral_classic.safetensors"); }
std::string mixtral_config() { return data_file("fixtures/hf/mixtral_classic_config.json"); }

}  // namespace

TEST_CASE("hf: the Qwen2-MoE block (packed experts, shared expert with sigmoid gate) reproduces its reference") {
  const auto fixture = read_json(data_file("fixtures/hf/qwen2_moe_layer0.json"));
  const io::safetensors_checkpoint ck(data_file("fixtures/hf/qwen2_moe_layer0.safetensors"));
  io::hf_moe_spec spec;
  spec.family = "qwen2_moe";
  spec.hidden = fixture["d_model"].get<index_t>();
  spec.experts = fixture["num_experts"].get<index_t>();
  spec.top_k = fixture["experts_per_token"].get<index_t>();
  spec.intermediate = fixture["d_ff"].get<index_t>();
  spec.shared_intermediate = spec.intermediate;
  spec.norm_topk_prob = fixture["norm_topk_prob"].get<bool>();
  REQUIRE(fixture["packed"].get<bool>());
  const moe_layer m = io::load_hf_moe_block(ck, fixture["tensor_prefix"].get<std::string>(), spec);
  CHECK(m.shared.size() == 1);
  CHECK(m.shared[0].gated());
  CHECK_FALSE(m.router.renormalize);

  const auto in = fixture["input"].get<std::vector<float>>();
  const auto ref = fixture["hf_ref"].get<std::vector<float>>();
  matrix x(1, spec.hidden);
  for (index_t i = 0; i < spec.hidden; ++i) x(0, i) = in[std::size_t(i)];
  const matrix y = runtime::moe_forward(m, x);
  double max_ref = 0, max_err = 0;
  for (index_t i = 0; i < spec.hidden; ++i) {
    max_ref = std::max(max_ref, std::abs(double(ref[std::size_t(i)])));
    max_err = std::max(max_err, std::abs(double(y(0, i)) - ref[std::size_t(i)]));
  }
  INFO("max |ref| " << max_ref << ", max error " << max_err);
  CHECK(max_ref > 0);
  CHECK(max_err <= 1e-4 * max_ref);

  // The same block with renormalised top-k is a different function: the flag is honoured.
  spec.norm_topk_prob = true;
  const matrix y2 = runtime::moe_forward(io::load_hf_moe_block(ck, "model.layers.0.mlp", spec), x);
  CHECK((y2 - y).cwiseAbs().maxCoeff() > 1e-2 * max_ref);
}

TEST_CASE("hf: Mixtral loads from per-expert and packed tensors to identical logits") {
  const auto classic = io::load_model(mixtral_file(), {mixtral_config()});
  CHECK(classic.config.arch == "mixtral");
  CHECK(classic.config.rope == model::rope_style::half_split);
  REQUIRE(std::holds_alternative<moe_layer>(classic.layers[1].ffn));
  const auto& m = std::get<moe_layer>(classic.layers[1].ffn);
  CHECK(m.num_experts() == 4);
  CHECK(m.router.top_k == 2);
  CHECK(m.router.renormalize);

  temp_dir tmp;
  const io::safetensors_checkpoint ck(mixtral_file());
  hf_dir_builder b(ck);
  pack_mixtral(b, 2, 4, 64, 32);
  const auto packed = io::load_model(b.write(tmp / "packed", read_json(mixtral_config())));
  const matrix a = logits(classic, probe_tokens), p = logits(packed, probe_tokens);
  CHECK(a.allFinite());
  CHECK((a - p).cwiseAbs().maxCoeff() == 0.0f);

  SECTION("save_hf writes the per-expert layout back, reloading to the same logits") {
    io::save_hf(packed, tmp / "saved");
    const auto again = io::load_model(tmp / "saved");
    CHECK((logits(again, probe_tokens) - a).cwiseAbs().maxCoeff() == 0.0f);
    CHECK(read_json(tmp / "saved/config.json")["model_type"] == "mixtral");
    CHECK(io::safetensors_checkpoint(tmp / "saved").contains("model.layers.1.block_sparse_moe.experts.3.w2.weight"));
  }
}

TEST_CASE("hf: load_transformer packs weights straight from the files, as if it read them first; a NaN is named alike") {
  temp_dir tmp;
  const io::safetensors_checkpoint ck(mixtral_file());
  const auto config = read_json(mixtral_config());
  for (const bool packed : {false, true})
    for (const auto stored : {dtype::f32, dtype::bf16, dtype::f16}) {
      const std::string name = std::string(packed ? "packed-" : "per-expert-") + std::string(dtype_name(stored));
      CAPTURE(name);
      hf_dir_builder b(ck);
      if (packed) pack_mixtral(b, 2, 4, 64, 32);
      const std::string dir = b.write(tmp / name, config, stored);
      const model::weights read = io::load_model(dir);
      CHECK(read.weight_dtype == (stored == dtype::f16 ? dtype::f32 : stored));  // F16 weights run as F32
      CHECK(logits(io::load_transformer(dir), probe_tokens) == logits(model::transformer(io::load_model(dir)), probe_tokens));
      // A NaN in an attention projection and in expert 3's up rows (in the
      // packed layout, past the gate rows of its slice): the error names the
      // tensor and the value's place as reading the tensor first does.
      const std::string expert = packed ? "model.layers.1.mlp.experts.gate_up_proj" : "model.layers.1.block_sparse_moe.experts.3.w3.weight";
      for (const auto& [tensor, at] : {std::pair<std::string, std::size_t>{"model.layers.0.self_attn.v_proj.weight", 70},
                                       {expert, packed ? std::size_t(3 * 128 * 32 + 64 * 32 + 37) : std::size_t(37)}}) {
        CAPTURE(tensor);
        hf_dir_builder nan = b;
        auto v = nan.get(tensor);
        v[at] = std::numeric_limits<float>::quiet_NaN();
        nan.set(tensor, v);
        const std::string poisoned = nan.write(tmp / (name + "-nan"), config, stored);
        std::string want;
        try {
          io::load_model(poisoned);
        } catch (const value_error& e) {
          want = e.what();
        }
        REQUIRE_THAT(want, Contains(tensor) && Contains("nan at [") && Contains(packed && tensor == expert ? "expert 3" : tensor));
        CHECK_THROWS_MATCHES(io::load_transformer(poisoned), value_error, Catch::Matchers::Message(want));
      }
    }
}

TEST_CASE("hf: BF16 weights beside F32 routers, norms and classifier run as BF16, from Hugging Face and native files") {
  temp_dir tmp;
  const std::string src = sharded_hf(tmp, "mixed", dtype::bf16, 2, {}, true, 64, kept_in_f32);
  const model::weights w = io::load_model(src);
  CHECK(w.weight_dtype == dtype::f32);  // not every matrix is BF16
  CHECK(w.run_dtype() == dtype::bf16);
  const auto tr = io::load_transformer(src);
  CHECK(tr.packed().classifier.type() == dtype::bf16);
  CHECK(tr.packed().embedding.type() == dtype::f32);  // kept exact, apart from the classifier
  CHECK(logits(tr, probe_tokens) == logits(model::transformer(model::weights(w), dtype::bf16), probe_tokens));
  // Saved as its source (BF16 weights, F32 routers, norms and head), a native directory runs so too.
  io::native_save_options as_source;
  as_source.as_source = true;
  io::save_native(w, tmp / "native", {}, as_source);
  CHECK(io::load_model(tmp / "native").run_dtype() == dtype::bf16);
  CHECK(logits(io::load_transformer(tmp / "native"), probe_tokens) == logits(tr, probe_tokens));
  // Exported to Hugging Face as its source, every tensor keeps the file's
  // type (the reload records the same ones) and the export runs the same;
  // by default its matrices share one type, F32 where they mix.
  REQUIRE(w.layers[0].file_dtypes.at("attn_norm") == dtype::f32);
  REQUIRE(w.layers[0].file_dtypes.at("wq") == dtype::bf16);
  io::save_hf(w, tmp / "hf", {false, true});
  const model::weights back = io::load_model(tmp / "hf");
  CHECK(back.file_dtypes == w.file_dtypes);
  for (std::size_t i = 0; i < w.layers.size(); ++i) CHECK(back.layers[i].file_dtypes == w.layers[i].file_dtypes);
  CHECK(logits(io::load_transformer(tmp / "hf"), probe_tokens) == logits(tr, probe_tokens));
  io::save_hf(w, tmp / "hf-one");
  CHECK(io::load_model(tmp / "hf-one").run_dtype() == dtype::f32);
  // One F32 weight matrix the kernels read, and the file runs in F32 as before.
  const std::string one = sharded_hf(tmp, "one", dtype::bf16, 1, {}, true, 64,
                                     [](const std::string& name) { return kept_in_f32(name) || name == "model.layers.1.self_attn.o_proj.weight"; });
  CHECK(io::load_model(one).run_dtype() == dtype::f32);
  io::save_native(io::load_model(one), tmp / "native-one", {}, as_source);
  CHECK(io::load_model(tmp / "native-one").run_dtype() == dtype::f32);
  // A dense model alike.
  CHECK(io::load_model(sharded_hf(tmp, "dense", dtype::bf16, 1, {}, false, 64, kept_in_f32)).run_dtype() == dtype::bf16);
}

namespace {

// Writes `b` as a Hugging Face directory, each tensor stored as `type_of` its shape says.
std::string write_typed(const hf_dir_builder& b, const std::string& dir, const nlohmann::json& config,
                        dtype (*type_of)(const std::vector<std::int64_t>&)) {
  std::filesystem::create_directories(dir);
  std::vector<io::tensor_info> infos;
  for (std::size_t i = 0; i < b.names.size(); ++i) infos.push_back({b.names[i], type_of(b.shapes[i]), b.shapes[i], 0, 0});
  io::safetensors_writer w(dir + "/model.safetensors", io::detail::header_text(infos, {{"format", "pt"}}).size() + 4096);
  for (std::size_t i = 0; i < b.names.size(); ++i) w.add(b.names[i], b.shapes[i], b.data[i].data(), infos[i].dtype);
  w.finish();
  write_json(dir + "/config.json", config);
  return dir;
}

}  // namespace

// weight_dtype ("BF16 when every matrix is stored in BF16") looked at 2-D
// tensors only, so transformers 5's packed experts ([E, 2I, H], [E, H, I])
// were left out: F32 experts beside BF16 attention ran rounded to BF16 by
// default, while the same tensors per expert ran in F32.
TEST_CASE("hf: packed F32 experts keep a model with BF16 attention in F32") {
  temp_dir tmp;
  const io::safetensors_checkpoint ck(mixtral_file());
  const auto config = read_json(mixtral_config());
  const auto f32_experts = [](const std::vector<std::int64_t>& shape) { return shape.size() == 3 ? dtype::f32 : dtype::bf16; };
  hf_dir_builder packed(ck);
  pack_mixtral(packed, 2, 4, 64, 32);
  const model::weights w = io::load_model(write_typed(packed, tmp / "packed", config, f32_experts));
  CHECK(w.weight_dtype == dtype::f32);
  CHECK(w.run_dtype() == dtype::f32);
  CHECK(w.file_dtype == dtype::f32);
  // Every tensor BF16, packed or not, and the model is BF16.
  const auto all_bf16 = [](const std::vector<std::int64_t>& shape) { return shape.size() == 1 ? dtype::f32 : dtype::bf16; };
  CHECK(io::load_model(write_typed(packed, tmp / "packed-bf16", config, all_bf16)).weight_dtype == dtype::bf16);
}

TEST_CASE("hf: stories260K exported to the LLaMA layout runs exactly as the llama2.c checkpoint") {
  const auto& ref = stories_weights();
  temp_dir tmp;
  io::save_hf(ref, tmp / "llama");
  const auto cfg = read_json(tmp / "llama/config.json");
  CHECK(cfg["model_type"] == "llama");
  CHECK(cfg["tie_word_embeddings"] == true);
  const auto hf = io::load_model(tmp / "llama");
  CHECK(hf.config.rope == model::rope_style::half_split);
  // The export reorders q/k rows, so the weights differ but the function must not.
  CHECK((hf.layers[0].wq - ref.layers[0].wq).cwiseAbs().maxCoeff() > 0);

  std::vector<std::int32_t> tokens{1};
  for (int i = 0; i < 200; ++i) tokens.push_back(std::int32_t(3 + (i * 37) % 500));
  const matrix a = logits(ref, tokens), b = logits(hf, tokens);
  INFO("max logit difference " << (a - b).cwiseAbs().maxCoeff());
  CHECK((a - b).cwiseAbs().maxCoeff() < 1e-4f);
  for (index_t t = 0; t < a.rows(); ++t) {
    index_t ia, ib;
    a.row(t).maxCoeff(&ia);
    b.row(t).maxCoeff(&ib);
    CHECK(ia == ib);
  }
}

TEST_CASE("hf: a Qwen2-MoE model (dense layers, shared expert, biases) round-trips through save_hf") {
  auto w = io::load_model(mixtral_file(), {mixtral_config()});
  std::mt19937 rng(3);
  const index_t h = w.config.dim;
  w.layers[0].ffn = random_ffn(h, 48, rng);
  auto& m = std::get<moe_layer>(w.layers[1].ffn);
  m.router.renormalize = false;
  m.shared.push_back(shared_expert{random_ffn(h, 40, rng), random_matrix(h, 1, rng)});
  for (auto& l : w.layers) {
    l.bq = random_matrix(l.wq.rows(), 1, rng);
    l.bk = random_matrix(l.wk.rows(), 1, rng);
    l.bv = random_matrix(l.wv.rows(), 1, rng);
  }
  temp_dir tmp;
  io::save_hf(w, tmp / "qwen");
  const auto cfg = read_json(tmp / "qwen/config.json");
  CHECK(cfg["model_type"] == "qwen2_moe");
  CHECK(cfg["mlp_only_layers"] == nlohmann::json::array({0}));
  CHECK(cfg["norm_topk_prob"] == false);
  const auto back = io::load_model(tmp / "qwen");
  CHECK(std::holds_alternative<ffn>(back.layers[0].ffn));
  CHECK((logits(back, probe_tokens) - logits(w, probe_tokens)).cwiseAbs().maxCoeff() == 0.0f);

  // In BF16 the shared expert's gate, a [1, H] matrix in the file, is BF16
  // like the other matrices, so the reloaded model still has one file type.
  auto bf16 = w;
  io::detail::for_each_tensor(
      bf16, [](const std::string&, matrix& x) { x = rounded_to_bf16(x); }, [](const std::string&, vector&) {});
  auto& gate = std::get<moe_layer>(bf16.layers[1].ffn).shared.front().gate;
  gate = rounded_to_bf16(gate);
  bf16.weight_dtype = dtype::bf16;
  io::save_hf(bf16, tmp / "qwen-bf16");
  const io::safetensors_checkpoint saved(tmp / "qwen-bf16");
  CHECK(saved.info("model.layers.1.mlp.shared_expert_gate.weight").dtype == dtype::bf16);
  const auto back16 = io::load_model(tmp / "qwen-bf16");
  CHECK(back16.file_dtype == dtype::bf16);
  CHECK(back16.weight_dtype == dtype::bf16);
  CHECK(logits(back16, probe_tokens) == logits(bf16, probe_tokens));

  // A checkpoint keeping that gate in F32 beside BF16 weights: the model
  // loaded from it and saved as its source (as conversions save) keeps it so.
  reshard(tmp / "qwen", tmp / "qwen-mixed", 1,
          [](const std::string& name) { return ends_with(name, "shared_expert_gate.weight") ? dtype::f32 : dtype::bf16; });
  const vector& gate32 = std::get<moe_layer>(w.layers[1].ffn).shared.front().gate;
  REQUIRE_FALSE(exact_in(dtype::bf16, gate32.data(), std::size_t(gate32.size())));
  const auto mixed = io::load_model(tmp / "qwen-mixed");
  io::native_save_options as_source;
  as_source.stored = mixed.stored_dtype();
  as_source.as_source = true;
  io::save_native(mixed, tmp / "qwen-native", {}, as_source);
  check_stored_types(tmp / "qwen-native", dtype::bf16, [](const std::string& name) { return ends_with(name, ".sigmoid_gate"); });
  CHECK(std::get<moe_layer>(io::load_model(tmp / "qwen-native").layers[1].ffn).shared.front().gate == gate32);
  io::save_hf(mixed, tmp / "qwen-hf", {false, true});  // and so does its Hugging Face export
  CHECK(io::safetensors_checkpoint(tmp / "qwen-hf").info("model.layers.1.mlp.shared_expert_gate.weight").dtype == dtype::f32);
  CHECK(io::safetensors_checkpoint(tmp / "qwen-hf").info("model.layers.1.self_attn.q_proj.bias").dtype == dtype::bf16);
  CHECK(std::get<moe_layer>(io::load_model(tmp / "qwen-hf").layers[1].ffn).shared.front().gate == gate32);

  SECTION("decoder_sparse_step decides which layers are MoE") {
    auto c2 = cfg;
    c2["mlp_only_layers"] = nlohmann::json::array();
    c2["decoder_sparse_step"] = 2;  // layer 1 is MoE ((1 + 1) % 2 == 0), layer 0 dense
    write_json(tmp / "qwen/config.json", c2);
    CHECK((logits(io::load_model(tmp / "qwen"), probe_tokens) - logits(w, probe_tokens)).cwiseAbs().maxCoeff() == 0.0f);
    c2["decoder_sparse_step"] = 1;  // now layer 0 should be MoE, and its tensors are not there
    write_json(tmp / "qwen/config.json", c2);
    CHECK_THROWS_WITH(io::load_model(tmp / "qwen"), Contains("model.layers.0.mlp.gate.weight"));
  }
}

TEST_CASE("hf: malformed configs and checkpoints fail with typed errors naming what is wrong") {
  temp_dir tmp;
  const io::safetensors_checkpoint ck(mixtral_file());
  const auto good = read_json(mixtral_config());
  auto with = [&](const std::string& name, const nlohmann::json& cfg, const hf_dir_builder& b) { return b.write(tmp / name, cfg); };
  const hf_dir_builder all(ck);

  SECTION("config keys") {
    auto c = good;
    c["model_type"] = "gpt2";
    CHECK_THROWS_AS(io::load_model(with("type", c, all)), format_error);
    CHECK_THROWS_WITH(io::load_model(tmp / "type"), Contains("model_type") && Contains("gpt2"));
    c = good;
    c["hidden_act"] = "gelu";
    CHECK_THROWS_WITH(io::load_model(with("act", c, all)), Contains("hidden_act") && Contains("silu"));
    c = good;
    c["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
    CHECK_THROWS_WITH(io::load_model(with("rope", c, all)), Contains("rope_scaling"));
    c = good;
    c.erase("hidden_size");
    CHECK_THROWS_WITH(io::load_model(with("missing", c, all)), Contains("hidden_size") && Contains("missing"));
    c = good;
    c["num_experts_per_tok"] = 5;
    CHECK_THROWS_WITH(io::load_model(with("topk", c, all)), Contains("num_experts_per_tok") && Contains("4 experts"));
    // A token id past int32 was narrowed to another id.
    for (const std::int64_t id : {std::int64_t(4294967298), std::int64_t(2147483648)}) {
      c = good;
      c["eos_token_id"] = id;
      CHECK_THROWS_WITH(io::load_model(with(std::to_string(id), c, all)), Contains("eos_token_id") && Contains("token id"));
    }
    c = good;
    c["num_attention_heads"] = "four";
    CHECK_THROWS_AS(io::load_model(with("heads", c, all)), format_error);
    std::ofstream(tmp / "heads/config.json") << "{\"model_type\": ";
    CHECK_THROWS_WITH(io::load_model(tmp / "heads"), Contains("config.json") && Contains("not valid JSON"));
  }

  SECTION("a config that contradicts the weights") {
    auto c = good;
    c["num_hidden_layers"] = 3;
    CHECK_THROWS_WITH(io::load_model(with("more", c, all)), Contains("model.layers.2."));
    c["num_hidden_layers"] = 1;
    CHECK_THROWS_WITH(io::load_model(with("fewer", c, all)), Contains("model.layers.1.") && Contains("not part of the model"));
    c = good;
    c["intermediate_size"] = 60;
    CHECK_THROWS_AS(io::load_model(with("width", c, all)), shape_error);
    CHECK_THROWS_WITH(io::load_model(tmp / "width"), Contains("experts.0.w1.weight") && Contains("[64, 32]") && Contains("[60, 32]"));
    c = good;
    c["tie_word_embeddings"] = true;  // tied: no lm_head needed; untied: it must be there
    hf_dir_builder no_head(ck);
    no_head.drop("lm_head.weight");
    CHECK_NOTHROW(io::load_model(with("tied", c, no_head)));
    CHECK_THROWS_WITH(io::load_model(with("untied", good, no_head)), Contains("missing tensor 'lm_head.weight'"));
  }

  SECTION("a config without tie_word_embeddings is untied, as Mixtral's and Qwen2-MoE's configs default") {
    auto c = good;
    c.erase("tie_word_embeddings");
    CHECK_FALSE(io::load_model(with("tie_default", c, all)).config.tied_embeddings);
    hf_dir_builder no_head(ck);
    no_head.drop("lm_head.weight");
    CHECK_THROWS_WITH(io::load_model(with("tie_default_no_head", c, no_head)), Contains("missing tensor 'lm_head.weight'"));
  }

  SECTION("tensors") {
    hf_dir_builder nan(ck);
    auto v = nan.get("model.layers.1.self_attn.k_proj.weight");
    v[5] = std::numeric_limits<float>::quiet_NaN();
    nan.put("model.layers.1.self_attn.k_proj.weight", {32, 32}, v);
    CHECK_THROWS_AS(io::load_model(with("nan", good, nan)), value_error);
    CHECK_THROWS_WITH(io::load_model(tmp / "nan"), Contains("model.layers.1.self_attn.k_proj.weight"));

    hf_dir_builder both(ck);
    pack_mixtral(both, 2, 4, 64, 32);
    for (const char* w : {"w1", "w2", "w3"}) {
      const std::string n = std::string("model.layers.0.mlp.experts.0.") + w + ".weight";
      both.put(n, w == std::string("w2") ? std::vector<std::int64_t>{32, 64} : std::vector<std::int64_t>{64, 32}, std::vector<float>(2048, 0.5f));
    }
    CHECK_THROWS_WITH(io::load_model(with("both", good, both)), Contains("both packed and per expert"));

    hf_dir_builder bad_pack(ck);
    pack_mixtral(bad_pack, 2, 4, 64, 32);
    bad_pack.put("model.layers.1.mlp.experts.down_proj", {4, 64, 32}, std::vector<float>(4 * 64 * 32, 0.f));
    CHECK_THROWS_WITH(io::load_model(with("badpack", good, bad_pack)), Contains("down_proj") && Contains("[4, 32, 64]"));

    // A truncated weights file is a safetensors error naming the file.
    with("trunc", good, all);
    const auto bytes = file_bytes(tmp / "trunc/model.safetensors");
    std::ofstream(tmp / "trunc/model.safetensors", std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size() - 100));
    CHECK_THROWS_AS(io::load_model(tmp / "trunc"), format_error);
    CHECK_THROWS_WITH(io::load_model(tmp / "trunc"), Contains("model.safetensors"));
  }

  SECTION("paths") {
    CHECK_THROWS_AS(io::load_model(tmp / "nothing-here"), io_error);
    std::filesystem::create_directories(tmp / "empty");
    CHECK_THROWS_WITH(io::load_model(tmp / "empty"), Contains("neither moeforge.json") && Contains("config.json"));
    std::filesystem::copy_file(mixtral_file(), tmp / "alone.safetensors");
    CHECK_THROWS_AS(io::load_model(tmp / "alone.safetensors"), io_error);
    CHECK_THROWS_WITH(io::load_model(tmp / "alone.safetensors"), Contains("config.json"));
  }
}

// transformers 5 writes RoPE's settings into one "rope_parameters" object
// instead of the top-level rope_theta / rope_scaling: its theta was ignored
// (the family default ran instead) and a scaled rope_type was run unscaled.
TEST_CASE("hf: rope_parameters (transformers 5) set theta or are refused") {
  temp_dir tmp;
  const io::safetensors_checkpoint ck(mixtral_file());
  const hf_dir_builder all(ck);
  auto c = read_json(mixtral_config());
  c.erase("rope_theta");
  c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  CHECK(io::load_model(all.write(tmp / "v5", c)).config.rope_theta == 500000.0f);

  c["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 500000.0}, {"factor", 4.0}};
  CHECK_THROWS_AS(io::load_model(all.write(tmp / "yarn", c)), format_error);
  CHECK_THROWS_WITH(io::load_model(tmp / "yarn"), Contains("rope_parameters") && Contains("yarn"));

  c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}, {"partial_rotary_factor", 0.5}};
  CHECK_THROWS_WITH(io::load_model(all.write(tmp / "partial", c)), Contains("partial_rotary_factor"));

  c["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  c["rope_theta"] = 10000.0;  // two thetas that disagree: which one the exporter meant is unknown
  CHECK_THROWS_WITH(io::load_model(all.write(tmp / "two", c)), Contains("rope_theta") && Contains("rope_parameters"));
}

// transformers reads partial_rotary_factor of any config (the default RoPE
// rotates only that share of each head); moeforge rotates all of it.
TEST_CASE("hf: a partial_rotary_factor below 1 is refused") {
  temp_dir tmp;
  const io::safetensors_checkpoint ck(mixtral_file());
  auto c = read_json(mixtral_config());
  c["partial_rotary_factor"] = 0.5;
  CHECK_THROWS_AS(io::load_model(hf_dir_builder(ck).write(tmp / "partial", c)), format_error);
  c["partial_rotary_factor"] = 1.0;
  CHECK_NOTHROW(io::load_model(hf_dir_builder(ck).write(tmp / "whole", c)));
}

// Mixtral applies sliding_window whenever it is set (it has no
// use_sliding_window switch), and layer_types can mark sliding layers in any
// family; moeforge attends to every earlier position, so either was run wrong.
TEST_CASE("hf: Mixtral's sliding_window and sliding layer_types are refused") {
  temp_dir tmp;
  const io::safetensors_checkpoint ck(mixtral_file());
  const hf_dir_builder all(ck);
  auto c = read_json(mixtral_config());
  c["max_position_embeddings"] = 64;
  c["sliding_window"] = 16;
  CHECK_THROWS_AS(io::load_model(all.write(tmp / "window", c)), format_error);
  CHECK_THROWS_WITH(io::load_model(tmp / "window"), Contains("sliding_window") && Contains("16"));
  c["sliding_window"] = 64;  // never narrower than the context: no position is ever left out
  CHECK_NOTHROW(io::load_model(all.write(tmp / "wide", c)));
  c["sliding_window"] = nullptr;
  CHECK_NOTHROW(io::load_model(all.write(tmp / "null", c)));

  c["layer_types"] = {"full_attention", "sliding_attention"};
  CHECK_THROWS_WITH(io::load_model(all.write(tmp / "types", c)), Contains("layer_types") && Contains("sliding_attention"));
  c["layer_types"] = {"full_attention", "full_attention"};
  CHECK_NOTHROW(io::load_model(all.write(tmp / "full", c)));
}

TEST_CASE("hf: save_hf refuses what Hugging Face cannot express and never clobbers") {
  std::mt19937 rng(5);
  auto w = io::load_model(mixtral_file(), {mixtral_config()});
  temp_dir tmp;
  io::save_hf(w, tmp / "out");
  const auto before = file_bytes(tmp / "out/model.safetensors");

  auto cmoe_like = w;
  std::get<moe_layer>(cmoe_like.layers[0].ffn).router.kind = router_kind::cmoe_analytic;
  std::get<moe_layer>(cmoe_like.layers[0].ffn).router.weight_up = random_matrix(4, w.config.dim, rng);
  CHECK_THROWS_AS(io::save_hf(cmoe_like, tmp / "out", {true}), config_error);
  CHECK_THROWS_WITH(io::save_hf(cmoe_like, tmp / "out", {true}), Contains("layer 0") && Contains("cmoe_analytic") && Contains("native"));

  auto novice = w;
  auto& e = std::get<moe_layer>(novice.layers[1].ffn).experts[2];
  e.weights = ffn{};
  e.novice = random_matrix(w.config.dim, 1, rng);
  CHECK_THROWS_WITH(io::save_hf(novice, tmp / "out", {true}), Contains("layer 1") && Contains("novice"));
  // ... also once its other experts are split into sub-experts (MoNE, then DualSparse's partition), whichever
  // expert the novice is: it is the reason, not the partition.
  for (const std::size_t which : {std::size_t(0), std::size_t(2)}) {
    auto split = w;
    auto& layer = std::get<moe_layer>(split.layers[1].ffn);
    layer.experts[which].weights = ffn{};
    layer.experts[which].novice = random_matrix(w.config.dim, 1, rng);
    convert::partition_experts(layer, 2);
    CHECK_THROWS_WITH(io::save_hf(split, tmp / "out", {true}), Contains("layer 1") && Contains("novice") && !Contains("even chunks"));
  }
  // A partition that does not divide the experts' width gives sub-experts of two widths: named as such.
  auto uneven = w;
  auto& layer = std::get<moe_layer>(uneven.layers[1].ffn);
  const index_t width = layer.experts[0].width(), parts = width % 3 ? 3 : 5;
  REQUIRE(width % parts != 0);
  convert::partition_experts(layer, parts);
  CHECK_THROWS_WITH(io::save_hf(uneven, tmp / "out", {true}), Contains("layer 1") && Contains("unequal widths") && Contains("divide the width"));

  CHECK_THROWS_AS(io::save_hf(w, tmp / "out"), io_error);  // exists, no overwrite
  CHECK(file_bytes(tmp / "out/model.safetensors") == before);
  std::size_t entries = 0;
  for ([[maybe_unused]] const auto& f : std::filesystem::directory_iterator(tmp.path())) ++entries;
  CHECK(entries == 1);  // no staging leftovers
}
