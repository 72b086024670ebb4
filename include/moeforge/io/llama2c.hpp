// llama2.c checkpoints (Karpathy's run.c format): header of 7 int32, then FP32
// arrays in a fixed order. Loaded whole into model::weights or not at all.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "moeforge/detail/read_file.hpp"
#include "moeforge/model/weights.hpp"

namespace moeforge::io {

/// Parses a llama2.c checkpoint held in memory; `name` is used in messages.
inline model::weights parse_llama2c(const char* data, std::size_t size, const std::string& name) {
  using moeforge::detail::cat;
  const std::string what = "llama2c: '" + name + "'";
  moeforge::detail::byte_reader r(data, size, what);
  const char* fields[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  std::int32_t h[7];
  for (int i = 0; i < 7; ++i) h[i] = r.scalar<std::int32_t>(fields[i]);
  // Two files often taken for this one, whose first bytes would read as an absurd dim.
  if (h[0] == 0x616b3432)
    throw format_error(cat(what, ": a llama2.c export of version ", size >= 8 ? h[1] : -1, " (magic \"ak42\"); only the legacy version-0 format (export.py --version 0) is read"));
  if (size >= 4 && std::memcmp(data, "PK\x03\x04", 4) == 0)
    throw format_error(cat(what, ": a zip archive (a PyTorch checkpoint?), not a llama2.c checkpoint; convert it to safetensors"));
  const bool shared_classifier = h[5] > 0;
  if (h[5] < 0 && h[5] != INT32_MIN) h[5] = -h[5];  // INT32_MIN stays negative and fails below
  for (int i = 0; i < 7; ++i)
    if (h[i] <= 0 || h[i] > (1 << 24)) throw format_error(cat(what, ": header field ", fields[i], " = ", h[i], ", expected 1..16777216"));
  if (h[0] % h[3] != 0) throw format_error(cat(what, ": dim ", h[0], " is not a multiple of n_heads ", h[3]));
  if (h[3] % h[4] != 0) throw format_error(cat(what, ": n_heads ", h[3], " is not a multiple of n_kv_heads ", h[4]));
  const index_t head_size = h[0] / h[3];
  if (head_size % 2 != 0) throw format_error(cat(what, ": head size ", head_size, " must be even for RoPE"));

  model::weights w;
  auto& c = w.config;
  c.arch = "llama2c";
  c.dim = h[0];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.head_dim = head_size;
  c.vocab_size = h[5];
  c.seq_len = h[6];
  c.rope = model::rope_style::interleaved;
  c.tied_embeddings = shared_classifier;
  const index_t dim = c.dim, hidden = h[1], layers = c.n_layers, kv_dim = head_size * c.n_kv_heads;

  // Check the total size first, so a wrong file fails before any allocation.
  // In 128 bits: dimensions up to 2^24 would overflow 64, and could wrap to a
  // size that matches a small file.
  using wide = unsigned __int128;
  const wide floats_expected = wide(c.vocab_size) * wide(dim) +
                               wide(layers) * (2 * wide(dim) + 2 * wide(dim) * wide(dim) + 2 * wide(kv_dim) * wide(dim) + 3 * wide(hidden) * wide(dim)) +
                               wide(dim) + wide(c.seq_len) * wide(head_size) + (shared_classifier ? 0 : wide(c.vocab_size) * wide(dim));
  const wide bytes_expected = 28 + floats_expected * 4;
  if (wide(size) != bytes_expected)
    throw format_error(cat(what, ": file is ", size, " bytes, the header (dim ", dim, ", hidden ", hidden, ", layers ", layers,
                           ", vocab ", c.vocab_size, ", seq_len ", c.seq_len, ") implies ",
                           bytes_expected > UINT64_MAX ? std::string("more than 2^64") : std::to_string(std::uint64_t(bytes_expected))));

  r.fill_matrix(w.tok_emb, c.vocab_size, dim, "tok_embeddings");
  w.layers.resize(std::size_t(layers));
  // The file stores each tensor kind for all layers together.
  for (auto& l : w.layers) r.fill_vector(l.attn_norm, dim, "rms_att_weight");
  for (auto& l : w.layers) r.fill_matrix(l.wq, dim, dim, "wq");
  for (auto& l : w.layers) r.fill_matrix(l.wk, kv_dim, dim, "wk");
  for (auto& l : w.layers) r.fill_matrix(l.wv, kv_dim, dim, "wv");
  for (auto& l : w.layers) r.fill_matrix(l.wo, dim, dim, "wo");
  for (auto& l : w.layers) r.fill_vector(l.ffn_norm, dim, "rms_ffn_weight");
  std::vector<ffn> ffns(static_cast<std::size_t>(layers));
  for (auto& f : ffns) r.fill_matrix(f.gate, hidden, dim, "w1");
  for (auto& f : ffns) r.fill_matrix(f.down, dim, hidden, "w2");
  for (auto& f : ffns) r.fill_matrix(f.up, hidden, dim, "w3");
  for (std::size_t i = 0; i < ffns.size(); ++i) w.layers[i].ffn = std::move(ffns[i]);
  r.fill_vector(w.final_norm, dim, "rms_final_weight");
  r.skip(std::size_t(c.seq_len * head_size) * 4, "freq_cis");
  if (!shared_classifier) r.fill_matrix(w.lm_head, c.vocab_size, dim, "wcls");
  return w;
}

/// Loads a llama2.c `.bin` checkpoint; throws format_error naming the file on any mismatch.
inline model::weights load_llama2c(const std::string& path) {
  const auto bytes = moeforge::detail::read_whole_file(path, "llama2c");
  return parse_llama2c(bytes.data(), bytes.size(), path);
}

}  // namespace moeforge::io
