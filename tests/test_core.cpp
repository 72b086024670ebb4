// Core types: dtype conversion, FFN and MoE-layer validation, matrix reuse.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <set>
#include <vector>

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

TEST_CASE("exact_in tells whether a type holds every value, which is when saving in it loses nothing") {
  const auto exact = [](dtype type, std::vector<float> v) { return exact_in(type, v.data(), v.size()); };
  // F16: 10 mantissa bits, 65504 the largest, 2^-24 the smallest subnormal, 2^-14 the smallest normal.
  CHECK(exact(dtype::f16, {0.0f, -0.0f, 1.0f + 1.0f / 1024, -65504.0f, 5.96046448e-8f, 6.103515625e-5f}));
  CHECK_FALSE(exact(dtype::f16, {1.0f, 1.0f + 1.0f / 2048}));  // rounds to 1
  CHECK_FALSE(exact(dtype::f16, {65520.0f}));                   // overflows to infinity
  CHECK_FALSE(exact(dtype::f16, {2.98023224e-8f}));             // 2^-25: below the smallest subnormal
  CHECK_FALSE(exact(dtype::f16, {std::numeric_limits<float>::quiet_NaN()}));
  // BF16: 7 mantissa bits, F32's range.
  CHECK(exact(dtype::bf16, {0.0f, -0.0f, 1.0f + 1.0f / 128, -3.0f, std::ldexp(1.0f, 100)}));
  CHECK_FALSE(exact(dtype::bf16, {1.0f + 1.0f / 256}));
  CHECK_FALSE(exact(dtype::bf16, {65505.0f}));
  CHECK(exact(dtype::f32, {1.0f + 1.0f / (1 << 23), std::numeric_limits<float>::denorm_min()}));
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
  m.router.scale = -1.0f;
  REQUIRE_THROWS_WITH(validate(m, "moe"), Catch::Contains("router.scale = -1"));
  m.router.scale = 0.5f;
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
  const matrix other = pool.take(5, 5);  // 25 elements: new storage, the 24 stay held
  CHECK(other.size() == 25);
  CHECK(pool.held() == 1);
  const matrix b = pool.take(3, 8);
  CHECK(b.data() == storage);
  CHECK((b.rows() == 3 && b.cols() == 8));
  CHECK(pool.held() == 0);

  ffn f{matrix(7, 5), matrix(7, 5), matrix(5, 7), activation::silu};
  const std::set<const float*> given{f.gate.data(), f.up.data(), f.down.data()};
  release(f, pool.sink());
  CHECK(pool.held() == 3);
  CHECK(f.up.size() == 0);
  REQUIRE(f.released);
  CHECK((f.hidden() == 5 && f.intermediate() == 7 && f.gated()));
  const matrix t1 = pool.take(7, 5), t2 = pool.take(5, 7), t3 = pool.take(35, 1);
  CHECK(std::set<const float*>{t1.data(), t2.data(), t3.data()} == given);

  pool.give(matrix(2, 2));
  CHECK(pool.held() == 1);
  pool.clear();
  CHECK(pool.held() == 0);
}

TEST_CASE("require_finite finds NaN and both infinities anywhere, in matrices, vectors and blocks, and names where") {
  const float bad[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  for (const float v : bad) {
    CAPTURE(v);
    matrix m = matrix::Constant(7, 13, 1e30f);  // huge but finite: x - x is still 0
    REQUIRE_NOTHROW(detail::require_finite(m, "m"));
    m(6, 12) = v;  // the last element, past every full vector
    REQUIRE_THROWS_AS(detail::require_finite(m, "m"), value_error);
    REQUIRE_THROWS_WITH(detail::require_finite(m, "m"), Catch::Contains(detail::cat("m: non-finite value ", v, " at [6, 12]")));
    REQUIRE_THROWS_AS(detail::require_finite(m.block(5, 11, 2, 2), "block"), value_error);
    REQUIRE_NOTHROW(detail::require_finite(m.block(0, 0, 6, 13), "block"));
    vector x = vector::Ones(17);
    x(16) = v;
    REQUIRE_THROWS_WITH(detail::require_finite(x, "x"), Catch::Contains("at [16, 0]"));
  }
  REQUIRE_NOTHROW(detail::require_finite(matrix(0, 5), "empty"));
}
