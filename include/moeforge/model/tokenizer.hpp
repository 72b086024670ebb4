// The llama2.c tokenizer (tok512.bin and friends): a scored vocabulary with
// byte fallback, encoded by greedy best-score pair merging as run.c does.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

#include "moeforge/core/tensor.hpp"
#include "moeforge/detail/read_file.hpp"

namespace moeforge::model {

class tokenizer {
 public:
  static constexpr std::int32_t bos = 1;
  static constexpr std::int32_t eos = 2;
  static constexpr std::int32_t byte_offset = 3;  ///< token of byte b is b + 3

  tokenizer(std::vector<std::string> pieces, std::vector<float> scores)
      : pieces_(std::move(pieces)), scores_(std::move(scores)) {
    for (std::size_t i = 0; i < pieces_.size(); ++i) lookup_.emplace(pieces_[i], std::int32_t(i));
  }

  std::size_t size() const { return pieces_.size(); }
  const std::string& piece(std::int32_t id) const { return pieces_.at(std::size_t(id)); }

  /// Token ids of `text`, with BOS first when `add_bos` (run.c's encode with bos=1, eos=0).
  std::vector<std::int32_t> encode(const std::string& text, bool add_bos = true) const {
    std::vector<std::int32_t> out;
    if (add_bos) out.push_back(bos);
    if (text.empty()) return out;
    const std::size_t first = out.size();  // BOS never merges
    // run.c prepends a space token (the sentencepiece dummy prefix) to non-empty text.
    if (auto it = lookup_.find(" "); it != lookup_.end()) out.push_back(it->second);
    const auto continues = [&](std::size_t at) { return (static_cast<unsigned char>(text[at]) & 0xc0) == 0x80; };
    for (std::size_t i = 0; i < text.size();) {
      // run.c's code point: any byte and the continuation bytes after it, at
      // most 4 in all, whatever the first byte announces (stray continuation
      // bytes join the character before them, and fall back to bytes with it).
      std::size_t len = 1;
      while (len < 4 && i + len < text.size() && continues(i + len)) ++len;
      if (auto it = lookup_.find(text.substr(i, len)); it != lookup_.end()) {
        out.push_back(it->second);
      } else {
        for (std::size_t j = 0; j < len; ++j) out.push_back(static_cast<unsigned char>(text[i + j]) + byte_offset);
      }
      i += len;
    }
    merge_pairs(out, first);
    return out;
  }

  /// The text of `id` when it follows `prev`: byte tokens become their byte, and
  /// the leading space of the first piece after BOS is dropped (as run.c does).
  std::string decode(std::int32_t prev, std::int32_t id) const {
    const std::string& p = piece(id);
    // "<0xHH>" with two hex digits; any other piece (even "<0xZZ>" from a
    // damaged file) is plain text, as run.c's sscanf leaves it.
    if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' && std::isxdigit(static_cast<unsigned char>(p[3])) &&
        std::isxdigit(static_cast<unsigned char>(p[4]))) {
      return std::string(1, char(std::stoi(p.substr(3, 2), nullptr, 16)));
    }
    if (prev == bos && !p.empty() && p[0] == ' ') return p.substr(1);
    return p;
  }

  /// The text of a token sequence (BOS/EOS produce nothing).
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string out;
    std::int32_t prev = bos;
    for (auto id : ids) {
      if (id != bos && id != eos) out += decode(prev, id);
      prev = id;
    }
    return out;
  }

 private:
  /// run.c merges the best-scoring adjacent pair (leftmost on ties) until none
  /// merges; that is O(n²) per merge. The same sequence of merges, found with a
  /// heap of candidate pairs over a linked list, costs O(n log n).
  void merge_pairs(std::vector<std::int32_t>& t, std::size_t first) const {
    const std::size_t n = t.size();
    if (n - first < 2) return;
    std::vector<std::size_t> next(n), prev(n);
    std::vector<bool> alive(n, true);
    for (std::size_t i = 0; i < n; ++i) {
      next[i] = i + 1;
      prev[i] = i - 1;  // wraps for i = 0; never read there
    }
    struct candidate {
      float score;
      std::size_t left;
      std::int32_t left_id, right_id, merged;
      bool operator<(const candidate& o) const { return score < o.score || (score == o.score && left > o.left); }
    };
    std::priority_queue<candidate> heap;
    std::string joined;
    auto consider = [&](std::size_t left) {
      const std::size_t right = next[left];
      if (left < first || right >= n) return;
      joined = pieces_[std::size_t(t[left])];
      joined += pieces_[std::size_t(t[right])];
      if (auto it = lookup_.find(joined); it != lookup_.end())
        heap.push({scores_[std::size_t(it->second)], left, t[left], t[right], it->second});
    };
    for (std::size_t i = first; i + 1 < n; ++i) consider(i);
    while (!heap.empty()) {
      const candidate c = heap.top();
      heap.pop();
      const std::size_t right = next[c.left];
      // Skip pairs that an earlier merge changed.
      if (!alive[c.left] || right >= n || t[c.left] != c.left_id || t[right] != c.right_id) continue;
      t[c.left] = c.merged;
      alive[right] = false;
      next[c.left] = next[right];
      if (next[right] < n) prev[next[right]] = c.left;
      if (c.left > first) consider(prev[c.left]);
      consider(c.left);
    }
    std::size_t out = first;
    for (std::size_t i = first; i < n; ++i)
      if (alive[i]) t[out++] = t[i];
    t.resize(out);
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, std::int32_t> lookup_;
};

/// Loads a llama2.c tokenizer file: int32 max_token_length, then per token
/// float32 score, int32 length, bytes. The vocabulary size comes from the model.
inline tokenizer load_tokenizer(const std::string& path, index_t vocab_size) {
  using moeforge::detail::cat;
  const auto bytes = moeforge::detail::read_whole_file(path, "tokenizer");
  const std::string what = "tokenizer: '" + path + "'";
  // encode() falls back to byte tokens 3..258: a smaller vocabulary would index past it.
  if (vocab_size < tokenizer::byte_offset + 256)
    throw format_error(cat(what, ": vocabulary size ", vocab_size, ", expected at least 259 (3 special and 256 byte tokens)"));
  // Each token takes at least 8 bytes: refuse before allocating for a vocabulary the file cannot hold.
  if (bytes.size() < 4 || std::size_t(vocab_size) > (bytes.size() - 4) / 8)
    throw format_error(cat(what, ": truncated: ", bytes.size(), " bytes cannot hold ", vocab_size, " tokens"));
  moeforge::detail::byte_reader r(bytes.data(), bytes.size(), what);
  const auto max_len = r.scalar<std::int32_t>("max_token_length");
  if (max_len <= 0 || max_len > 1 << 16) throw format_error(cat(what, ": max_token_length = ", max_len, ", expected 1..65536"));
  std::vector<std::string> pieces(static_cast<std::size_t>(vocab_size));
  std::vector<float> scores(static_cast<std::size_t>(vocab_size));
  for (index_t i = 0; i < vocab_size; ++i) {
    scores[std::size_t(i)] = r.scalar<float>("score");
    const auto len = r.scalar<std::int32_t>("token length");
    if (len < 0 || len > max_len) throw format_error(cat(what, ": token ", i, " has length ", len, ", expected 0..", max_len));
    pieces[std::size_t(i)].resize(std::size_t(len));
    r.bytes(pieces[std::size_t(i)].data(), std::size_t(len), "token bytes");
  }
  if (r.remaining() != 0)
    throw format_error(cat(what, ": ", r.remaining(), " bytes left after ", vocab_size, " tokens (wrong vocabulary size?)"));
  return tokenizer(std::move(pieces), std::move(scores));
}

}  // namespace moeforge::model
