// moeforge: dense-to-MoE conversion (CMoE), expert partition and dropping
// (DualSparse-MoE), expert pruning (MoNE), and a fast OpenMP sparse FFN kernel.
// The umbrella header: includes every public header, nothing else.
#pragma once

#include "moeforge/core/error.hpp"
#include "moeforge/core/tensor.hpp"
#include "moeforge/core/ffn.hpp"
#include "moeforge/core/moe.hpp"
#include "moeforge/runtime/routing.hpp"
#include "moeforge/runtime/dense_ffn.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "moeforge/model/weights.hpp"
#include "moeforge/model/transformer.hpp"
#include "moeforge/model/tokenizer.hpp"
#include "moeforge/model/sampling.hpp"
#include "moeforge/model/eval.hpp"
#include "moeforge/calib/markers.hpp"
#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/calib/expert_stats.hpp"
#include "moeforge/convert/driver.hpp"
#include "moeforge/convert/assignment.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/io/safetensors.hpp"
#include "moeforge/io/llama2c.hpp"
#include "moeforge/io/hf.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/io/load.hpp"
