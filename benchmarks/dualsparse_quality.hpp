// moeforge-bench dualsparse's quality part (bench_dualsparse_quality.cpp), as
// the command in bench_dualsparse.cpp calls it.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moeforge/core/tensor.hpp"

namespace moeforge::cli::dualsparse_bench {

struct quality_options {
  std::string data;
  std::vector<std::string> configs{"S1A3E8", "S0A2E8"};
  /// A model to use instead of CMoE conversions of stories260K: any MoE model
  /// moeforge loads whose vocabulary is stories260K's tokenizer's.
  std::string model;
  std::vector<double> drop_rates{0, 0.1, 0.2, 0.3, 0.4};
  index_t calib_tokens = 8192;
  index_t eval_windows = 0;  ///< 0: the whole evaluation text
};

/// The quality rows: per model, policy × metric × target drop rate (realised
/// drop rate on calibration and evaluation text, perplexity), then the
/// load-aware thresholds' group loads for D = 2, 4, 8.
std::vector<nlohmann::json> quality(const quality_options& o);

}  // namespace moeforge::cli::dualsparse_bench
