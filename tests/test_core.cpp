// Core types: dtype conversion, FFN and MoE-layer validation, matrix reuse.
#include <catch2/catch.hpp>

#include <limits>
#include <set>

#include "moeforge/core/memory.hpp"
#include "moeforge/core/moe.hpp"

using namespace moeforge;

TEST_CASE("f16 and bf16 round-trip every representable value") {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = std::uint16_t(h);
    const float half = f16_to_f32(bits);
    if (std::isnan(half))
      REQUIRE(std::isnan(f16_to_f32(f32_to_f16(half))));
    else
      REQUIRE(f32_to_f16(half) == bits);
    const float brain = bf16_to_f32(bits);
    if (std::isnan(brain))
      REQUIRE(std::isnan(bf16_to_f32(f32_to_bf16(brain))));
    else
      REQUIRE(f32_to_bf16(brain) == bits);
  }
}

TEST_CASE("f16 conversion rounds to nearest even and saturates to infinity") {
  CHECK(f16_to_f32(f32_to_f16(1.0f + 1.0f / 2048)) == 1.0f);                 // tie, even stays
  CHECK(f16_to_f32(f32_to_f16(1.0f + 3.0f / 2048)) == 1.0f + 2.0f / 1024);   // tie, rounds up to even
  CHECK(std::isinf(f16_to_f32(f32_to_f16(70000.0f))));
  CHECK(f16_to_f32(f32_to_f16(65504.0f)) == 65504.0f);
  CHECK(f16_to_f32(f32_to_f16(5.96046448e-8f)) == 5.96046448e-8f);  // smallest subnormal
  CHECK(bf16_to_f32(f32_to_bf16(1.00390625f)) == 1.0f);             // tie to even
}

namespace {
ffn make_ffn(index_t h, index_t i) {
  ffn f;
  f.gate = matrix::Ones(i, h);
  f.up = matrix::Ones(i, h);
  f.down = matrix::Ones(h, i);
  return f;
}
}  // namespace

TEST_CASE("ffn validation names the matrix and the expected shape") {
  ffn f = make_ffn(4, 6);
  REQUIRE_NOTHROW(validate(f, "layer0"));
  f.down.resize(4, 5);
  REQUIRE_THROWS_WITH(validate(f, "layer0"), Catch::Contains("layer0.down") && Catch::Contains("expected [4, 6]"));
  f = make_ffn(4, 6);
  f.up(2, 3) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(require_finite(f, "layer0"), value_error);
}

TEST_CASE("moe layer validation rejects impossible configurations") {
  moe_layer m;
  m.router.weight = matrix::Ones(3, 4);
  for (int e = 0; e < 3; ++e) m.experts.push_back({make_ffn(4, 2), {}, 0, {}});
  m.router.top_k = 2;
  REQUIRE_NOTHROW(validate(m, "moe"));
  m.router.top_k = 4;
  REQUIRE_THROWS_AS(validate(m, "moe"), config_error);
  m.router.top_k = 0;
  REQUIRE_THROWS_WITH(validate(m, "moe"), Catch::Contains("top_k = 0"));
  m.router.top_k = 1;
  m.experts[1].novice = vector::Zero(4);
  REQUIRE_THROWS_WITH(validate(m, "moe"), Catch::Contains("experts[1]") && Catch::Contains("novice"));
  m.experts[1].weights = ffn{};
  REQUIRE_NOTHROW(validate(m, "moe"));
  m.router.kind = router_kind::cmoe_analytic;
  REQUIRE_THROWS_WITH(validate(m, "moe"), Catch::Contains("weight_up"));
}

TEST_CASE("a matrix pool hands storage back reshaped only for the same element count, and released FFNs feed it") {
  detail::matrix_pool pool;
  matrix a(6, 4);
  const float* storage = a.data();
  pool.give(std::move(a));
  pool.give(matrix());  // nothing to keep
  CHECK(pool.held() == 1);
  const matrix other = pool.take(5, 5);  // 25 elements: new storage
  CHECK(other.data() != storage);
  CHECK(pool.held() == 1);
  const matrix b = pool.take(3, 8);
  CHECK(b.data() == storage);
  CHECK((b.rows() == 3 && b.cols() == 8));
  CHECK(pool.held() == 0);

  ffn f{matrix(7, 5), matrix(7, 5), matrix(5, 7), activation::silu};
  const float* up = f.up.data();
  release(f, pool.sink());
  CHECK(pool.held() == 3);
  CHECK(f.up.size() == 0);
  REQUIRE(f.released);
  CHECK((f.hidden() == 5 && f.intermediate() == 7 && f.gated()));
  std::set<const float*> kept;
  for (int i = 0; i < 3; ++i) kept.insert(pool.take(7, 5).data());
  CHECK(kept.count(up) == 1);
}
