// A Hugging Face dense qwen2 checkpoint (q/k/v biases, grouped-query
// attention, half-split RoPE with the config's rope_theta, tied or untied
// head), written here with random weights, loaded through io::load_model and
// checked against a float64 forward pass written for this test.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "moeforge/io/load.hpp"
#include "support/safetensors_writer.hpp"
#include "support/temp_dir.hpp"
#include "support/util.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

struct qwen2_shape {
  int vocab = 50, dim = 48, heads = 6, kv_heads = 2, head_dim = 8, ffn = 40, layers = 2;
  double rope_theta = 5000, eps = 1e-5;  // not qwen2's defaults, so the config must be read
};

// Row-major [rows, cols] in double, as the checkpoint stores them.
struct qwen2_tensor {
  int rows = 0, cols = 1;
  std::vector<double> v;
  double operator()(int r, int c) const { return v[std::size_t(r * cols + c)]; }
};

using qwen2_checkpoint = std::map<std::string, qwen2_tensor>;

// Weights N(0, scale²) rounded to float (the checkpoint's precision), norms near 1.
qwen2_checkpoint qwen2_random(const qwen2_shape& s, bool tied, std::mt19937& rng) {
  qwen2_checkpoint ck;
  const auto add = [&](const std::string& name, int rows, int cols, double mean, double scale) {
    std::normal_distribution<double> n(mean, scale);
    qwen2_tensor t{rows, cols, {}};
    for (int i = 0; i < rows * cols; ++i) t.v.push_back(double(float(n(rng))));
    ck[name] = t;
  };
  const int q = s.heads * s.head_dim, kv = s.kv_heads * s.head_dim;
  add("model.embed_tokens.weight", s.vocab, s.dim, 0, 1);
  add("model.norm.weight", s.dim, 1, 1, 0.1);
  if (!tied) add("lm_head.weight", s.vocab, s.dim, 0, 1 / std::sqrt(s.dim));
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", s.dim, 1, 1, 0.1);
    add(p + "post_attention_layernorm.weight", s.dim, 1, 1, 0.1);
    add(p + "self_attn.q_proj.weight", q, s.dim, 0, 1 / std::sqrt(s.dim));
    add(p + "self_attn.k_proj.weight", kv, s.dim, 0, 1 / std::sqrt(s.dim));
    add(p + "self_attn.v_proj.weight", kv, s.dim, 0, 1 / std::sqrt(s.dim));
    // Biases as large as the projections' outputs: dropping one changes the logits by O(1).
    add(p + "self_attn.q_proj.bias", q, 1, 0, 1);
    add(p + "self_attn.k_proj.bias", kv, 1, 0, 1);
    add(p + "self_attn.v_proj.bias", kv, 1, 0, 1);
    add(p + "self_attn.o_proj.weight", s.dim, q, 0, 1 / std::sqrt(q));
    add(p + "mlp.gate_proj.weight", s.ffn, s.dim, 0, 1 / std::sqrt(s.dim));
    add(p + "mlp.up_proj.weight", s.ffn, s.dim, 0, 1 / std::sqrt(s.dim));
    add(p + "mlp.down_proj.weight", s.dim, s.ffn, 0, 1 / std::sqrt(s.ffn));
  }
  return ck;
}

void qwen2_write(const std::string& dir, const qwen2_shape& s, bool tied, const qwen2_checkpoint& ck) {
  std::filesystem::create_directories(dir);
  write_json(dir + "/config.json", {{"architectures", {"Qwen2ForCausalLM"}},
                                    {"model_type", "qwen2"},
                                    {"hidden_act", "silu"},
                                    {"vocab_size", s.vocab},
                                    {"hidden_size", s.dim},
                                    {"intermediate_size", s.ffn},
                                    {"num_hidden_layers", s.layers},
                                    {"num_attention_heads", s.heads},
                                    {"num_key_value_heads", s.kv_heads},
                                    {"max_position_embeddings", 64},
                                    {"rms_norm_eps", s.eps},
                                    {"rope_theta", s.rope_theta},
                                    {"tie_word_embeddings", tied},
                                    {"use_sliding_window", false},
                                    {"torch_dtype", "float32"}});
  std::vector<raw_tensor> tensors;
  for (const auto& [name, t] : ck) {
    raw_tensor r{name, t.cols == 1 ? std::vector<std::int64_t>{t.rows} : std::vector<std::int64_t>{t.rows, t.cols}, {}};
    for (double v : t.v) r.values.push_back(float(v));
    tensors.push_back(r);
  }
  write_tensors(dir + "/model.safetensors", tensors);
}

using qwen2_rows = std::vector<std::vector<double>>;  // [tokens][features]

// y = W·x (+ b) for each row x.
qwen2_rows qwen2_linear(const qwen2_rows& x, const qwen2_tensor& w, const qwen2_tensor* b = nullptr) {
  qwen2_rows y(x.size(), std::vector<double>(std::size_t(w.rows)));
  for (std::size_t t = 0; t < x.size(); ++t)
    for (int o = 0; o < w.rows; ++o) {
      double a = b ? b->v[std::size_t(o)] : 0.0;
      for (int i = 0; i < w.cols; ++i) a += w(o, i) * x[t][std::size_t(i)];
      y[t][std::size_t(o)] = a;
    }
  return y;
}

qwen2_rows qwen2_rms_norm(const qwen2_rows& x, const qwen2_tensor& w, double eps) {
  qwen2_rows y = x;
  for (auto& row : y) {
    double ms = 0;
    for (double v : row) ms += v * v;
    const double inv = 1 / std::sqrt(ms / double(row.size()) + eps);
    for (std::size_t i = 0; i < row.size(); ++i) row[i] *= inv * w.v[i];
  }
  return y;
}

// Rotates dimensions (j, j + head_dim/2) of every head by position·θ^(−2j/head_dim).
void qwen2_rope(qwen2_rows& x, int heads, const qwen2_shape& s) {
  const int half = s.head_dim / 2;
  for (std::size_t pos = 0; pos < x.size(); ++pos)
    for (int h = 0; h < heads; ++h)
      for (int j = 0; j < half; ++j) {
        const double angle = double(pos) * std::pow(s.rope_theta, -2.0 * j / s.head_dim);
        double& a = x[pos][std::size_t(h * s.head_dim + j)];
        double& b = x[pos][std::size_t(h * s.head_dim + j + half)];
        const double a0 = a, b0 = b;
        a = a0 * std::cos(angle) - b0 * std::sin(angle);
        b = b0 * std::cos(angle) + a0 * std::sin(angle);
      }
}

// The whole model on `tokens` from position 0: logits [tokens][vocab].
qwen2_rows qwen2_forward(const qwen2_checkpoint& ck, const qwen2_shape& s, bool tied, const std::vector<std::int32_t>& tokens) {
  const std::size_t n = tokens.size();
  const auto& emb = ck.at("model.embed_tokens.weight");
  qwen2_rows x(n);
  for (std::size_t t = 0; t < n; ++t)
    x[t].assign(emb.v.begin() + tokens[t] * s.dim, emb.v.begin() + (tokens[t] + 1) * s.dim);
  const auto add_to_x = [&](const qwen2_rows& y) {
    for (std::size_t t = 0; t < n; ++t)
      for (int i = 0; i < s.dim; ++i) x[t][std::size_t(i)] += y[t][std::size_t(i)];
  };
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const auto& w = [&](const std::string& name) -> const qwen2_tensor& { return ck.at(p + name); };
    const qwen2_rows h = qwen2_rms_norm(x, w("input_layernorm.weight"), s.eps);
    qwen2_rows q = qwen2_linear(h, w("self_attn.q_proj.weight"), &w("self_attn.q_proj.bias"));
    qwen2_rows k = qwen2_linear(h, w("self_attn.k_proj.weight"), &w("self_attn.k_proj.bias"));
    const qwen2_rows v = qwen2_linear(h, w("self_attn.v_proj.weight"), &w("self_attn.v_proj.bias"));
    qwen2_rope(q, s.heads, s);
    qwen2_rope(k, s.kv_heads, s);
    qwen2_rows att(n, std::vector<double>(std::size_t(s.heads * s.head_dim), 0.0));
    for (int head = 0; head < s.heads; ++head) {
      const int g = head / (s.heads / s.kv_heads);  // consecutive query heads share a kv head
      for (std::size_t t = 0; t < n; ++t) {
        std::vector<double> p_att(t + 1);
        double mx = -std::numeric_limits<double>::infinity(), sum = 0;
        for (std::size_t u = 0; u <= t; ++u) {
          double d = 0;
          for (int i = 0; i < s.head_dim; ++i) d += q[t][std::size_t(head * s.head_dim + i)] * k[u][std::size_t(g * s.head_dim + i)];
          mx = std::max(mx, p_att[u] = d / std::sqrt(double(s.head_dim)));
        }
        for (double& e : p_att) sum += e = std::exp(e - mx);
        for (std::size_t u = 0; u <= t; ++u)
          for (int i = 0; i < s.head_dim; ++i)
            att[t][std::size_t(head * s.head_dim + i)] += p_att[u] / sum * v[u][std::size_t(g * s.head_dim + i)];
      }
    }
    add_to_x(qwen2_linear(att, w("self_attn.o_proj.weight")));
    const qwen2_rows h2 = qwen2_rms_norm(x, w("post_attention_layernorm.weight"), s.eps);
    qwen2_rows gate = qwen2_linear(h2, w("mlp.gate_proj.weight"));
    const qwen2_rows up = qwen2_linear(h2, w("mlp.up_proj.weight"));
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t i = 0; i < gate[t].size(); ++i) gate[t][i] = gate[t][i] / (1 + std::exp(-gate[t][i])) * up[t][i];
    add_to_x(qwen2_linear(gate, w("mlp.down_proj.weight")));
  }
  return qwen2_linear(qwen2_rms_norm(x, ck.at("model.norm.weight"), s.eps), ck.at(tied ? "model.embed_tokens.weight" : "lm_head.weight"));
}

}  // namespace

TEST_CASE("a qwen2 checkpoint with attention biases gives the logits of an independent float64 forward pass") {
  const qwen2_shape s;
  const std::vector<std::int32_t> tokens{3, 17, 42, 5, 0, 49, 17, 8, 23};
  test::temp_dir tmp;
  std::mt19937 rng(2024);
  for (bool tied : {false, true}) {
    INFO((tied ? "tied" : "untied") << " head");
    const qwen2_checkpoint ck = qwen2_random(s, tied, rng);
    const std::string dir = tmp / (tied ? "tied" : "untied");
    qwen2_write(dir, s, tied, ck);
    const model::weights w = io::load_model(dir);
    REQUIRE(w.layers[0].bq.size() == s.heads * s.head_dim);
    const matrix got = logits(w, tokens);
    const qwen2_rows want = qwen2_forward(ck, s, tied, tokens);
    // float32 rounds a sum of ≤ 48 products to within 48·2⁻²⁴ ≈ 3e-6 of its
    // terms' magnitude (typically √48·2⁻²⁴ ≈ 4e-7); two layers of such sums,
    // norms and softmaxes leave the logits within a few 1e-6 of their scale
    // (measured: 4e-7), while a wrong bias, head mapping or rotation moves
    // them by O(0.1) of it.
    double worst = 0, scale = 0;
    for (std::size_t t = 0; t < tokens.size(); ++t)
      for (int o = 0; o < s.vocab; ++o) {
        worst = std::max(worst, std::abs(double(got(index_t(t), o)) - want[t][std::size_t(o)]));
        scale = std::max(scale, std::abs(want[t][std::size_t(o)]));
      }
    INFO("max |logit| " << scale << ", max error " << worst);
    CHECK(scale > 1);
    CHECK(worst < 1e-5 * scale);
  }
}
