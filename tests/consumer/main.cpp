// Builds a two-expert MoE whose experts split one dense FFN and checks that,
// with both experts active at unit weight, it reproduces the dense output.
// The kernel's headers, not the umbrella: the package's include path, flags
// and link are what this checks (the examples compile the umbrella).
#include <moeforge/runtime/dense_ffn.hpp>
#include <moeforge/runtime/moe_ffn.hpp>

#include <cstdio>

int main() {
  using namespace moeforge;
  ffn dense;
  dense.gate = matrix::Random(6, 5);
  dense.up = matrix::Random(6, 5);
  dense.down = matrix::Random(5, 6);

  moe_layer m;
  m.router.kind = router_kind::softmax_topk;
  m.router.weight = matrix::Random(2, 5);
  m.router.top_k = 2;
  m.router.renormalize = false;
  const int first[] = {0, 1, 2}, second[] = {3, 4, 5};
  m.experts.push_back({select_neurons(dense, first), {}, 0});
  m.experts.push_back({select_neurons(dense, second), {}, 0});
  validate(m, "consumer");

  const matrix x = matrix::Random(3, 5);
  // Softmax weights sum to 1 over both experts; undo them per token to compare.
  const auto plan = runtime::route(m, x);
  runtime::routing_plan unit = plan;
  for (auto& w : unit.weight) w = 1.0f;
  matrix y(3, 5);
  runtime::moe_forward(m, unit, x, y);
  const matrix want = runtime::dense_forward(dense, x);
  const float err = (y - want).cwiseAbs().maxCoeff();
  std::printf("consumer: max |moe - dense| = %g\n", double(err));
  return err < 1e-5f ? 0 : 1;
}
