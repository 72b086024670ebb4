// Runs the sparse MoE kernel on a layer built by hand: 8 routed experts of
// different widths, top-2 softmax routing, one shared expert. Shows the two
// entry points: moe_forward(layer, x) routes and computes; route() then
// moe_forward(layer, plan, x, y) keeps the routing plan for inspection.
// Usage: moe_kernel [TOKENS]
#include <cstdio>
#include <string>

// The kernel alone needs only its header (the umbrella moeforge.hpp brings
// conversion and file formats too, and compiles several times slower).
#include <moeforge/runtime/moe_ffn.hpp>

#include "arguments.hpp"

int main(int argc, char** argv) try {
  using namespace moeforge;
  const index_t hidden = 256, tokens = argc > 1 ? number_argument<index_t>(argv[1], "TOKENS", 0, 1 << 20) : 16;
  const auto random_ffn = [&](index_t width) {
    ffn f;  // SiLU-gated, rows are neurons: gate/up [width, H], down [H, width]
    f.gate = matrix::Random(width, hidden) * 0.1f;
    f.up = matrix::Random(width, hidden) * 0.1f;
    f.down = matrix::Random(hidden, width) * 0.1f;
    return f;
  };

  moe_layer layer;
  layer.router.kind = router_kind::softmax_topk;
  layer.router.weight = matrix::Random(8, hidden);
  layer.router.top_k = 2;
  for (index_t e = 0; e < 8; ++e) layer.experts.push_back({random_ffn(96 + 16 * e), {}, 0, {}});
  layer.shared.push_back({random_ffn(128), {}});
  validate(layer, "example layer");  // throws config_error/shape_error naming what is wrong

  const matrix x = matrix::Random(tokens, hidden);
  const matrix y = runtime::moe_forward(layer, x);

  const runtime::routing_plan plan = runtime::route(layer, x);
  matrix again(tokens, hidden);
  runtime::moe_forward(layer, plan, x, again);
  std::printf("%lld tokens, %lld token-expert pairs, |y| = %.4f, same result from the plan: %s\n",
              static_cast<long long>(tokens), static_cast<long long>(plan.pairs()), y.norm(), y == again ? "yes" : "NO");
  return y == again ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
