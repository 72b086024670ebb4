// DualSparse-MoE: partial and complete transformations and reconstruction are
// exact; the drop policies follow their definitions on hand-computed tokens;
// threshold calibration hits its target; bad options are refused; the real
// model keeps its perplexity until something is dropped.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <filesystem>
#include <random>

#include "moeforge/calib/ffn_inputs.hpp"
#include "moeforge/convert/cmoe.hpp"
#include "moeforge/convert/dualsparse.hpp"
#include "moeforge/io/hf.hpp"
#include "moeforge/io/native.hpp"
#include "moeforge/model/eval.hpp"
#include "moeforge/runtime/moe_ffn.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/stories.hpp"
#include "support/temp_dir.hpp"

using namespace moeforge;
using namespace moeforge::test;

namespace {

float max_diff(const matrix& a, const matrix& b) { return (a - b).cwiseAbs().maxCoeff(); }

/// Every router kind, with and without renormalisation and with a scale.
std::vector<moe_layer> layers_of_every_router(std::mt19937& rng) {
  std::vector<moe_layer> out;
  for (auto kind : all_router_kinds)
    for (bool renorm : {true, false}) {
      layer_spec s;
      s.kind = kind;
      s.shared = 1;
      s.shared_gate = true;
      s.widths = {13, 20, 7, 31, 16};
      s.novices = {2};
      moe_layer m = random_layer(s, rng);
      m.router.top_k = 2;
      m.router.renormalize = renorm;
      m.router.scale = renorm ? 1.0f : 1.5f;
      out.push_back(std::move(m));
    }
  return out;
}

/// A selection of one token with the given top-k probabilities (descending).
runtime::selection one_token(std::vector<float> probs) {
  runtime::selection sel;
  sel.tokens = 1;
  sel.k = index_t(probs.size());
  for (std::size_t j = 0; j < probs.size(); ++j) {
    sel.expert.push_back(std::int32_t(j));
    sel.prob.push_back(probs[j]);
    sel.weight.push_back(probs[j]);
    sel.work.push_back(runtime::pair_work::full);
  }
  return sel;
}

std::vector<runtime::pair_work> works(const drop_policy& d, std::vector<float> probs) {
  auto sel = one_token(std::move(probs));
  runtime::apply_drop(d, sel);
  return sel.work;
}

using runtime::pair_work;

const model::weights& stories_cmoe() {
  static const model::weights w = [] {
    model::weights c = stories_weights();
    convert::cmoe_options o;
    o.config = convert::parse_cmoe_config("S1A3E8");
    const auto windows = calib::calibration_windows(stories_text("tinystories_calib.txt"), 512, 2048);
    convert::cmoe_model(c, [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, windows); }, o);
    return c;
  }();
  return w;
}

convert::ffn_inputs_fn stories_inputs(index_t tokens) {
  auto windows = std::make_shared<std::vector<std::vector<std::int32_t>>>(
      calib::calibration_windows(stories_text("tinystories_calib.txt"), 512, tokens));
  return [windows](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, *windows); };
}

}  // namespace

TEST_CASE("the partial transformation into P sub-experts leaves every router kind's output unchanged") {
  std::mt19937 rng(11);
  for (auto m : layers_of_every_router(rng)) {
    const matrix x = random_matrix(40, m.hidden(), rng, 1.0f);
    const matrix want = runtime::moe_forward(m, x);
    for (index_t p = 1; p <= 4; ++p) {  // widths 7..31 are not all multiples of 2, 3 or 4
      moe_layer part = m;
      convert::partition_experts(part, p);
      INFO(router_kind_name(m.router.kind) << " renormalize " << m.router.renormalize << " P " << p);
      CHECK(part.experts[0].sub_experts() == p);
      CHECK(max_diff(runtime::moe_forward(part, x), want) < 1e-5f);
    }
  }
}

TEST_CASE("the complete transformation is a plain MoE with E·P experts and the same output for every router kind") {
  std::mt19937 rng(12);
  for (const auto& m : layers_of_every_router(rng)) {
    const matrix x = random_matrix(40, m.hidden(), rng, 1.0f);
    const matrix want = reference::moe(m, x);
    for (index_t p = 1; p <= 4; ++p) {
      const moe_layer c = convert::complete_transformation(m, p);
      INFO(router_kind_name(m.router.kind) << " renormalize " << m.router.renormalize << " P " << p);
      CHECK(c.num_experts() == m.num_experts() * p);
      CHECK(c.router.top_k == m.router.top_k * p);
      for (const auto& e : c.experts) CHECK(e.parts.empty());
      CHECK(max_diff(runtime::moe_forward(c, x), want) < 1e-4f);
    }
  }
}

TEST_CASE("reconstruction is a permutation whose major part holds the most important neurons") {
  std::mt19937 rng(13);
  layer_spec s;
  s.widths = {12, 9, 16};
  moe_layer m = random_layer(s, rng);
  m.router.top_k = 2;
  const matrix x = random_matrix(300, s.hidden, rng, 1.0f);
  const matrix want = runtime::moe_forward(m, x);
  const auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
  for (auto metric : calib::all_importance_metrics) {
    if (metric == calib::importance_metric::none) continue;
    calib::expert_stats_options so;
    so.importance = metric;
    const auto st = calib::expert_statistics(m, x, so);
    moe_layer r = m;
    for (std::size_t e = 0; e < r.experts.size(); ++e) {
      // Importance computed directly in double over the tokens routed to e.
      const ffn& f = m.experts[e].weights;
      std::vector<double> imp(std::size_t(f.intermediate()), 0.0);
      for (index_t t = 0; t < sel.tokens; ++t)
        for (index_t j = 0; j < sel.k; ++j) {
          if (sel.expert[std::size_t(t * sel.k + j)] != std::int32_t(e)) continue;
          for (index_t i = 0; i < f.intermediate(); ++i) {
            double g = 0, u = 0;
            for (index_t d = 0; d < s.hidden; ++d) {
              g += double(f.gate(i, d)) * x(t, d);
              u += double(f.up(i, d)) * x(t, d);
            }
            const double a = reference::act(f.act, g);
            const double v = metric == calib::importance_metric::act ? a
                             : metric == calib::importance_metric::abs_act ? std::abs(a)
                             : metric == calib::importance_metric::prod ? a * u
                                                                         : std::abs(a * u);
            imp[std::size_t(i)] += v;
          }
        }
      REQUIRE(st.experts[e].importance.size() == f.intermediate());
      for (index_t i = 0; i < f.intermediate(); ++i)
        CHECK(st.experts[e].importance[i] == Approx(imp[std::size_t(i)]).epsilon(1e-4).margin(1e-4));
      convert::reconstruct(r.experts[e], st.experts[e].importance);
      r.experts[e].major = convert::major_width_for(r.experts[e].width(), 0.5);
      // The major rows are the gate rows of the top-importance neurons.
      std::vector<index_t> order(imp.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return imp[std::size_t(a)] > imp[std::size_t(b)]; });
      for (index_t i = 0; i < r.experts[e].major; ++i) CHECK(r.experts[e].weights.gate.row(i) == f.gate.row(order[std::size_t(i)]));
    }
    INFO("metric " << calib::importance_name(metric));
    CHECK(max_diff(runtime::moe_forward(r, x), want) < 1e-5f);
  }
}

TEST_CASE("drop policies: threshold 0 keeps everything, 2t with margin 0 is 1t, naee and top-p on hand-computed tokens") {
  drop_policy d;
  d.kind = drop_kind::one_t;
  d.threshold = 0.0f;
  CHECK(works(d, {0.7f, 0.2f, 0.1f}) == std::vector<pair_work>(3, pair_work::full));
  d.kind = drop_kind::two_t;
  d.margin = 0.0f;
  CHECK(works(d, {0.7f, 0.2f, 0.1f}) == std::vector<pair_work>(3, pair_work::full));
  // ŝ = (0.5, 0.3, 0.2) after normalising over the top-k.
  for (float t : {0.1f, 0.25f, 0.35f, 0.6f}) {
    drop_policy one, two;
    one.kind = drop_kind::one_t;
    two.kind = drop_kind::two_t;
    one.threshold = two.threshold = t;
    two.margin = 0.0f;
    CHECK(works(one, {0.25f, 0.15f, 0.1f}) == works(two, {0.25f, 0.15f, 0.1f}));
  }
  d.kind = drop_kind::one_t;
  d.threshold = 0.25f;
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>{pair_work::full, pair_work::full, pair_work::dropped});
  d.kind = drop_kind::two_t;
  d.threshold = 0.25f;
  d.margin = 0.06f;  // full from 0.31, major from 0.19: ŝ 0.5 full, 0.3 major, 0.2 major
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>{pair_work::full, pair_work::major, pair_work::major});
  d.margin = 0.02f;  // full from 0.27, major from 0.23: 0.3 full, 0.2 dropped
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>{pair_work::full, pair_work::full, pair_work::dropped});
  // NAEE: drop j if p_j < β·p_1 (here β·p_1 = 0.5·0.25 = 0.125); the top-1 always stays.
  d.kind = drop_kind::naee;
  d.threshold = 0.5f;
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>{pair_work::full, pair_work::full, pair_work::dropped});
  d.threshold = 1.0f;
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>{pair_work::full, pair_work::dropped, pair_work::dropped});
  // top-p on ŝ (0.5, 0.3, 0.2): keep while the mass kept so far is below p.
  d.kind = drop_kind::top_p;
  d.threshold = 0.5f;
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>{pair_work::full, pair_work::dropped, pair_work::dropped});
  d.threshold = 0.6f;
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>{pair_work::full, pair_work::full, pair_work::dropped});
  d.threshold = 1.0f;
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>(3, pair_work::full));
  // Per-expert factors lower an expert's threshold: expert 2 at factor 0.5 needs ŝ ≥ 0.125.
  d.kind = drop_kind::one_t;
  d.threshold = 0.25f;
  d.expert_factor = {1.0f, 1.0f, 0.5f};
  CHECK(works(d, {0.25f, 0.15f, 0.1f}) == std::vector<pair_work>(3, pair_work::full));
}

TEST_CASE("1t and 2t keep a pair whose normalised score equals the threshold — computed iff ŝ ≥ T") {
  // Scores exact in binary: the top-k sums to 1, so ŝ = p and T ± margin are exact.
  const std::vector<float> probs{0.5f, 0.25f, 0.125f, 0.125f};
  drop_policy d;
  d.kind = drop_kind::one_t;
  d.threshold = 0.25f;
  CHECK(works(d, probs) == std::vector<pair_work>{pair_work::full, pair_work::full, pair_work::dropped, pair_work::dropped});
  d.threshold = 0.125f;
  CHECK(works(d, probs) == std::vector<pair_work>(4, pair_work::full));
  d.threshold = 0.0f;  // threshold 0 keeps every pair, even one of probability 0
  CHECK(works(d, {0.75f, 0.25f, 0.0f}) == std::vector<pair_work>(3, pair_work::full));
  d.kind = drop_kind::two_t;
  d.threshold = 0.375f;
  d.margin = 0.125f;  // full from ŝ = 0.5, major from ŝ = 0.25
  CHECK(works(d, probs) == std::vector<pair_work>{pair_work::full, pair_work::major, pair_work::dropped, pair_work::dropped});
}

TEST_CASE("2t with a per-expert factor: the margin scales too") {
  // What moe.hpp's drop_kind says (it read as T·f ± margin): with T = 0.5,
  // margin 0.25 and factor 0.5, full from (0.5 + 0.25)·0.5 = 0.375 and major
  // from 0.125, not from 0.5 and 0.
  drop_policy d;
  d.kind = drop_kind::two_t;
  d.threshold = 0.5f;
  d.margin = 0.25f;
  d.expert_factor.assign(4, 0.5f);
  CHECK(works(d, {0.5f, 0.375f, 0.125f}) == std::vector<pair_work>{pair_work::full, pair_work::full, pair_work::major});
  CHECK(works(d, {0.75f, 0.125f, 0.0625f, 0.0625f}) == std::vector<pair_work>{pair_work::full, pair_work::major, pair_work::dropped, pair_work::dropped});
}

TEST_CASE("the calibrated threshold gives the drop rate nearest the target that any threshold gives") {
  std::mt19937 rng(31);
  layer_spec s;
  s.shared = 1;
  s.widths = {13, 20, 7, 31, 16};
  moe_layer m = random_layer(s, rng);
  m.router.top_k = 3;
  const matrix x = random_matrix(40, s.hidden, rng, 1.0f);
  const std::vector<convert::routing_sample> samples{{&m, runtime::select_topk(m.router, runtime::router_probs(m.router, x))}};
  // The rate steps where the threshold passes a pair's ŝ: every rate a
  // threshold in [0, 1] gives is the rate at 0, at 1, at some ŝ or just above it.
  std::vector<float> candidates{0.0f, 1.0f};
  const auto& sel = samples[0].selection;
  for (index_t t = 0; t < sel.tokens; ++t) {
    float sum = 0.0f;
    for (index_t j = 0; j < sel.k; ++j) sum += sel.prob[std::size_t(t * sel.k + j)];
    for (index_t j = 0; j < sel.k; ++j) {
      const float v = sel.prob[std::size_t(t * sel.k + j)] * (1.0f / sum);
      candidates.push_back(v);
      candidates.push_back(std::nextafter(v, 2.0f));
    }
  }
  for (auto kind : {drop_kind::one_t, drop_kind::two_t})
    for (double target : {0.05, 0.1, 0.17, 0.25, 0.33}) {
      drop_policy d;
      d.kind = kind;
      d.margin = 0.0f;  // 2t with margin 0 steps where 1t does
      const auto rate = [&](float t) {
        d.threshold = t;
        return convert::work_under(samples, d).drop_rate();
      };
      double best = std::numeric_limits<double>::infinity();
      for (float c : candidates)
        if (c <= 1.0f) best = std::min(best, std::abs(rate(c) - target));
      const float got = convert::calibrate_threshold(samples, d, target);
      INFO(drop_kind_name(kind) << " target " << target << " threshold " << got);
      CHECK(std::abs(rate(got) - target) <= best);
    }
}

TEST_CASE("a partition's sub-experts differ in width by at most one, the first of the larger width, and cover the expert in order") {
  for (index_t width = 1; width <= 24; ++width)
    for (index_t parts = 1; parts <= width; ++parts) {
      const auto cuts = convert::even_cuts(width, parts);
      INFO("width " << width << " parts " << parts);
      REQUIRE(index_t(cuts.size()) == parts - 1);
      std::vector<index_t> bounds{0};
      bounds.insert(bounds.end(), cuts.begin(), cuts.end());
      bounds.push_back(width);
      for (std::size_t p = 0; p + 1 < bounds.size(); ++p) {
        const index_t size = bounds[p + 1] - bounds[p];
        CHECK(size >= width / parts);
        CHECK(size <= (width + parts - 1) / parts);
      }
      CHECK(bounds[1] == (width + parts - 1) / parts);  // the first part is a larger one
    }
  // P = 2 cuts at the default major width, ⌈width/2⌉.
  routed_expert e;
  std::mt19937 rng(5);
  e.weights = random_ffn(6, 9, rng);
  CHECK(convert::even_cuts(9, 2) == std::vector<index_t>{e.major_width()});
}

TEST_CASE("drop-rate accounting counts shared experts in the denominator and a major-only pair's minor part as dropped") {
  // Gated experts of widths 10 and 6 (major 4), a shared expert of width 8, ungated novice slot 2.
  moe_layer m;
  std::mt19937 rng(14);
  m.router.weight = random_matrix(3, 5, rng);
  m.router.top_k = 2;
  m.experts.push_back({random_ffn(5, 10, rng), {}, 0, {}});
  m.experts.push_back({random_ffn(5, 6, rng), {}, 4, {}});
  routed_expert novice;
  novice.novice = vector::Ones(5);
  m.experts.push_back(novice);
  m.shared.push_back({random_ffn(5, 8, rng), {}});
  runtime::selection sel;
  sel.tokens = 2;
  sel.k = 2;
  sel.expert = {0, 1, 1, 2};
  sel.prob = sel.weight = {0.6f, 0.4f, 0.7f, 0.3f};
  sel.work = {pair_work::full, pair_work::major, pair_work::dropped, pair_work::full};
  const auto r = runtime::count_work(m, sel);
  // Per token: shared 8 neurons; selected 10 + 6 (token 0) and 6 + novice 0 (token 1); kept 10 + 4 and 0.
  CHECK(r.shared == 3.0 * 16);
  CHECK(r.selected == 3.0 * 22);
  CHECK(r.kept == 3.0 * 14);
  CHECK(r.drop_rate() == Approx(8.0 / 38.0));
  CHECK(r.active_fraction() == Approx((16.0 + 14.0) / (2.0 * 24.0)));
}

TEST_CASE("threshold calibration hits the requested drop rate within one pair, globally and per layer, for every policy") {
  model::weights w = stories_cmoe();
  const auto inputs = stories_inputs(1024);
  for (auto kind : {drop_kind::one_t, drop_kind::two_t, drop_kind::naee, drop_kind::top_p})
    for (auto scope : {convert::drop_scope::global, convert::drop_scope::layer}) {
      model::weights c = w;
      convert::dualsparse_options o;
      o.policy.kind = kind;
      o.drop_rate = 0.2;
      o.scope = scope;
      o.partition = 2;
      o.metric = calib::importance_metric::abs_act;
      const auto rep = convert::dualsparse_model(c, inputs, o);
      INFO(drop_kind_name(kind) << " " << convert::drop_scope_name(scope));
      // One pair's share of a layer's work: the widest expert over (shared + top-k experts) per token, over the tokens.
      const auto& m = std::get<moe_layer>(c.layers[0].ffn);
      const double per_token = double(m.shared[0].weights.intermediate() + m.router.top_k * m.experts[0].width());
      const double pair = double(m.experts[0].width()) / (per_token * double(rep.layers[0].tokens));
      if (scope == convert::drop_scope::global)
        CHECK(std::abs(rep.drop_rate_calib - 0.2) <= pair);
      else
        for (const auto& l : rep.layers) CHECK(std::abs(l.drop_rate_calib - 0.2) <= pair);
      for (const auto& l : c.layers) CHECK(std::get<moe_layer>(l.ffn).router.drop.kind == kind);
    }
}

TEST_CASE("partition and reconstruction keep stories260K's CMoE perplexity; dropping costs perplexity and is carried by the saved model", "[slow]") {
  const model::weights& w = stories_cmoe();
  const auto text = stories_text("tinystories_eval.txt");
  const auto base = model::perplexity(model::transformer(w), text, 512, 8);
  CHECK(base.work.drop_rate() == 0.0);
  for (auto metric : calib::all_importance_metrics) {
    model::weights c = w;
    convert::dualsparse_options o;
    o.partition = 3;
    o.metric = metric;
    convert::dualsparse_model(c, stories_inputs(1024), o);
    const auto r = model::perplexity(model::transformer(c), text, 512, 8);
    INFO("metric " << calib::importance_name(metric));
    CHECK(std::abs(r.ppl - base.ppl) <= 1e-6 * base.ppl);
  }
  model::weights c = w;
  convert::dualsparse_options o;
  o.metric = calib::importance_metric::abs_act;
  o.policy.kind = drop_kind::two_t;
  o.drop_rate = 0.3;
  convert::dualsparse_model(c, stories_inputs(1024), o);
  const auto dropped = model::perplexity(model::transformer(c), text, 512, 8);
  CHECK(dropped.work.drop_rate() > 0.2);
  CHECK(dropped.work.drop_rate() < 0.4);
  CHECK(dropped.ppl > base.ppl);
  temp_dir dir;
  io::save_native(c, dir / "m");
  const model::weights back = io::load_native(dir / "m");
  for (std::size_t l = 0; l < c.layers.size(); ++l) {
    const auto& a = std::get<moe_layer>(c.layers[l].ffn);
    const auto& b = std::get<moe_layer>(back.layers[l].ffn);
    CHECK(b.router.drop.kind == a.router.drop.kind);
    CHECK(b.router.drop.threshold == a.router.drop.threshold);
    CHECK(b.router.drop.margin == a.router.drop.margin);
    for (std::size_t e = 0; e < a.experts.size(); ++e) CHECK(b.experts[e].major == a.experts[e].major);
  }
  CHECK(model::perplexity(model::transformer(back), text, 512, 8).nll == dropped.nll);
}

TEST_CASE("load-aware thresholds lower only the under-loaded groups' thresholds and drop less") {
  model::weights c = stories_cmoe();
  convert::dualsparse_options o;
  o.policy.kind = drop_kind::one_t;
  o.drop_rate = 0.25;
  o.groups = 4;
  const auto rep = convert::dualsparse_model(c, stories_inputs(1024), o);
  for (const auto& l : rep.layers) {
    REQUIRE(l.groups);
    const auto& g = *l.groups;
    const double mean = (g.routed[0] + g.routed[1] + g.routed[2] + g.routed[3]) / 4;
    for (std::size_t d = 0; d < 4; ++d) {
      if (g.routed[d] >= mean) {
        CHECK(g.factor[d] == 1.0f);
        CHECK(g.after[d] == g.before[d]);  // a loaded group keeps the base threshold
      } else {
        CHECK(g.factor[d] >= Approx(g.routed[d] / mean));  // T·r_d, or raised to stay within the most loaded group
        CHECK(g.factor[d] <= 1.0f);
        CHECK(g.after[d] >= g.before[d]);
      }
      CHECK(g.after[d] <= convert::detail::max_of(g.before));
    }
    CHECK(g.drop_rate_after <= g.drop_rate_before);
  }
}

TEST_CASE("load-aware thresholds never make the most loaded group's work larger — T·r_d is raised where it would") {
  // Groups just under the mean load whose pairs sit near the threshold would keep more than the most loaded
  // group at T·r_d (26 of these 600 layers and thresholds did): their factor is the lowest that keeps them within.
  int raised = 0;
  for (int seed = 0; seed < 200; ++seed) {
    std::mt19937 rng(seed);
    layer_spec s;
    s.hidden = 16;
    s.widths.assign(8, 8);
    moe_layer m = random_layer(s, rng);
    m.router.top_k = 2;
    const matrix x = random_matrix(64, 16, rng, 1.0f);
    const auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, x));
    for (const float t : {0.3f, 0.4f, 0.45f}) {
      drop_policy p;
      p.kind = drop_kind::one_t;
      p.threshold = t;
      const auto g = convert::load_aware_thresholds(m, sel, p, runtime::contiguous_placement(8, 4));
      INFO("seed " << seed << ", threshold " << t);
      const double mean = convert::detail::mean_of(g.routed), most = convert::detail::max_of(g.before);
      for (std::size_t d = 0; d < 4; ++d) {
        CHECK(g.after[d] <= most);
        if (g.routed[d] >= mean) continue;
        const float spec = float(g.routed[d] / mean);
        CHECK(g.factor[d] >= spec);
        if (g.factor[d] == spec) continue;
        ++raised;
        // Raised as little as holds: a slightly lower factor for that group keeps more than the most loaded.
        drop_policy lower = p;
        for (std::size_t e = 0; e < 8; ++e)
          if (g.placement[e] == index_t(d)) lower.expert_factor[e] = std::nextafter(g.factor[d], 0.0f);
        runtime::selection kept = sel;
        runtime::apply_drop(lower, kept);
        CHECK(runtime::group_work(m, kept, g.placement, 4, false)[d] > most);
      }
      CHECK(g.modelled_time(g.after) <= g.modelled_time(g.before));
    }
  }
  CHECK(raised > 0);
}

TEST_CASE("load-aware thresholds with an empty group: refused") {
  // An empty group counts in the mean load, so experts on groups 0 and 3 of
  // four were balanced unlike the same experts on groups 0 and 1 of two (and
  // unlike on groups 0 and 1 of four, whose empty groups 2 and 3 were not
  // counted at all): dualsparse_model refuses such a placement (check_groups),
  // and load_aware_thresholds, which bench_ep calls with the ranks' experts,
  // must too.
  std::mt19937 rng(3);
  layer_spec s;
  s.hidden = 16;
  s.widths.assign(4, 8);
  moe_layer m = random_layer(s, rng);
  m.router.top_k = 2;
  const auto sel = runtime::select_topk(m.router, runtime::router_probs(m.router, random_matrix(32, 16, rng, 1.0f)));
  drop_policy p;
  p.kind = drop_kind::one_t;
  p.threshold = 0.4f;
  CHECK_THROWS_WITH(convert::load_aware_thresholds(m, sel, p, {0, 0, 3, 3}), Catch::Contains("leaves group 1 of 4 without an expert"));
  CHECK_NOTHROW(convert::load_aware_thresholds(m, sel, p, {0, 0, 1, 1}));
}

TEST_CASE("a partitioned model without dropping exports to Hugging Face as its complete transformation") {
  // A Mixtral-style model: the fixture's MoE layers, partitioned.
  model::weights w = io::load_hf(data_file("fixtures/hf/mixtral_classic.safetensors"), data_file("fixtures/hf/mixtral_classic_config.json"));
  for (auto& l : w.layers) convert::partition_experts(std::get<moe_layer>(l.ffn), 2);
  const std::vector<std::int32_t> tokens{1, 5, 9, 2, 7};
  const matrix want = logits(w, tokens);
  temp_dir dir;
  io::save_hf(w, dir / "hf");
  const model::weights back = io::load_hf(dir / "hf");
  const auto& m = std::get<moe_layer>(back.layers[0].ffn);
  const auto& orig = std::get<moe_layer>(w.layers[0].ffn);
  CHECK(m.num_experts() == 2 * orig.num_experts());
  CHECK(m.router.top_k == 2 * orig.router.top_k);
  CHECK(max_diff(logits(back, tokens), want) < 1e-4f);
  // With a drop policy there is no Hugging Face form.
  std::get<moe_layer>(w.layers[0].ffn).router.drop.kind = drop_kind::one_t;
  CHECK_THROWS_AS(io::save_hf(w, dir / "hf2"), config_error);
  CHECK_FALSE(std::filesystem::exists(dir / "hf2"));
}

TEST_CASE("dualsparse refuses bad options with a typed error naming them and leaves the model untouched") {
  const model::weights& w = stories_cmoe();
  const auto inputs = stories_inputs(512);
  auto refuses = [&](const convert::dualsparse_options& o, const std::string& words) {
    model::weights c = w;
    try {
      convert::dualsparse_model(c, inputs, o);
      FAIL("no error for: " << words);
    } catch (const config_error& e) {
      CHECK_THAT(e.what(), Catch::Contains(words));
    }
    CHECK(std::get<moe_layer>(c.layers[0].ffn).experts[0].weights.up == std::get<moe_layer>(w.layers[0].ffn).experts[0].weights.up);
    CHECK(std::get<moe_layer>(c.layers[0].ffn).experts[0].major == std::get<moe_layer>(w.layers[0].ffn).experts[0].major);
    CHECK_FALSE(std::get<moe_layer>(c.layers[0].ffn).router.drop.active());
  };
  convert::dualsparse_options o;
  o.partition = 0;
  refuses(o, "partition P = 0");
  o.partition = 1000;
  refuses(o, "exceeds expert");
  o = {};
  o.policy.kind = drop_kind::one_t;
  o.threshold = 1.5;
  refuses(o, "threshold 1.5");
  o.threshold.reset();
  o.drop_rate = 1.0;
  refuses(o, "drop rate 1");
  o.drop_rate = 0.2;
  o.policy.kind = drop_kind::two_t;
  o.policy.margin = -0.1f;
  refuses(o, "margin");
  o.policy.margin = std::numeric_limits<float>::infinity();
  refuses(o, "margin inf, expected a finite value");
  o = {};
  o.policy.kind = drop_kind::one_t;
  refuses(o, "needs a threshold or a target drop rate");
  o.major_fraction = 0;
  o.threshold = 0.1;
  refuses(o, "major fraction");
  // Placements: a group past the groups given, or past the experts; a group left without an expert.
  o = {};
  o.policy.kind = drop_kind::one_t;
  o.threshold = 0.1;
  o.placement = {0, 1, 2, 3, 0, 1, 9};
  refuses(o, "placement leaves group 4 of 10 without an expert");
  o.placement = {0, 1, 2, 3, 0, 1, 2};
  o.groups = 2;
  refuses(o, "placement puts expert 2 on group 2, expected 0..1 (groups = 2)");
  o.groups = 5;
  refuses(o, "placement leaves group 4 of 5 without an expert");
  o.groups = 0;
  o.placement = {0, 0, 3, 3, 0, 3, 0};
  refuses(o, "placement leaves group 1 of 4 without an expert");
  // NAEE's β from calibration needs top-2 routing: refused before any layer is touched.
  o = {};
  o.policy.kind = drop_kind::naee;
  o.major_fraction = 0.25;  // (so that a layer prepared before the error would show it)
  for (const auto scope : {convert::drop_scope::global, convert::drop_scope::layer}) {
    o.scope = scope;
    model::weights top1 = w;
    for (auto& layer : top1.layers)
      if (auto* m = std::get_if<moe_layer>(&layer.ffn)) m->router.top_k = 1;
    const model::weights before = top1;
    CHECK_THROWS_WITH(convert::dualsparse_model(top1, inputs, o), Catch::Contains("naee needs top_k >= 2 in "));
    for (std::size_t l = 0; l < top1.layers.size(); ++l) {
      const auto &now = std::get<moe_layer>(top1.layers[l].ffn), &then = std::get<moe_layer>(before.layers[l].ffn);
      for (std::size_t e = 0; e < now.experts.size(); ++e) {
        CHECK(now.experts[e].major == then.experts[e].major);
        CHECK(now.experts[e].weights.up == then.experts[e].weights.up);
      }
    }
  }
  model::weights dense = stories_weights();
  CHECK_THROWS_WITH(convert::dualsparse_model(dense, inputs, {}), Catch::Contains("convert it first with `moeforge convert cmoe`"));
  CHECK_THROWS_AS(calib::calibration_windows({}, 512, 16), config_error);  // empty calibration text
}

TEST_CASE("dualsparse calibrates without the drop policies a model already carries — sparsifying again gives the same model") {
  const model::weights& w = stories_cmoe();
  const auto inputs = stories_inputs(512);
  convert::dualsparse_options o;
  o.policy.kind = drop_kind::one_t;
  o.drop_rate = 0.2;
  // The scopes whose layers calibrate on the model as it came (global; layer scope, not sequential).
  for (const auto scope : {convert::drop_scope::global, convert::drop_scope::layer}) {
    o.scope = scope;
    o.sequential = false;
    model::weights fresh = w, again = w;
    for (auto& layer : again.layers) {
      auto& m = std::get<moe_layer>(layer.ffn);
      m.router.drop.kind = drop_kind::one_t;
      m.router.drop.threshold = 0.4f;
    }
    const auto a = convert::dualsparse_model(fresh, inputs, o), b = convert::dualsparse_model(again, inputs, o);
    INFO("global scope " << (scope == convert::drop_scope::global));
    CHECK(a.drop_rate_calib == b.drop_rate_calib);
    for (std::size_t l = 0; l < fresh.layers.size(); ++l) {
      const auto &m1 = std::get<moe_layer>(fresh.layers[l].ffn), &m2 = std::get<moe_layer>(again.layers[l].ffn);
      CHECK(m1.router.drop.threshold == m2.router.drop.threshold);
      for (std::size_t e = 0; e < m1.experts.size(); ++e) CHECK(m1.experts[e].weights.up == m2.experts[e].weights.up);
    }
  }
}

TEST_CASE("dualsparse runs on a Hugging Face Mixtral and a Qwen2-MoE-style layer with a shared expert") {
  model::weights w = io::load_hf(data_file("fixtures/hf/mixtral_classic.safetensors"), data_file("fixtures/hf/mixtral_classic_config.json"));
  std::mt19937 rng(21);
  std::uniform_int_distribution<std::int32_t> id(0, std::int32_t(w.config.vocab_size) - 1);
  std::vector<std::vector<std::int32_t>> windows(8, std::vector<std::int32_t>(32));
  for (auto& win : windows)
    for (auto& t : win) t = id(rng);
  const convert::ffn_inputs_fn inputs = [&](const model::weights& m, index_t l) { return calib::ffn_inputs(m, l, windows); };
  const matrix before = logits(w, windows[0]);
  convert::dualsparse_options o;
  o.metric = calib::importance_metric::abs_prod;
  o.partition = 2;
  model::weights exact = w;
  convert::dualsparse_model(exact, inputs, o);
  CHECK(max_diff(logits(exact, windows[0]), before) < 1e-5f);
  o.policy.kind = drop_kind::two_t;
  o.drop_rate = 0.15;
  const auto rep = convert::dualsparse_model(w, inputs, o);
  CHECK(std::abs(rep.drop_rate_calib - 0.15) < 0.02);
  // A layer with a gated shared expert (Qwen2-MoE's form) counts it in the denominator.
  layer_spec s;
  s.shared = 1;
  s.shared_gate = true;
  moe_layer q = random_layer(s, rng);
  q.router.top_k = 2;
  const matrix x = random_matrix(200, s.hidden, rng, 1.0f);
  std::vector<convert::routing_sample> one{{&q, runtime::select_topk(q.router, runtime::router_probs(q.router, x))}};
  drop_policy d;
  d.kind = drop_kind::one_t;
  d.threshold = convert::calibrate_threshold(one, d, 0.1);
  CHECK(std::abs(convert::work_under(one, d).drop_rate() - 0.1) < 0.02);
}

TEST_CASE("naee's calibrated beta is the median of p2/p1 over the calibration tokens, not their mean") {
  // Ratios 0.1, 0.9 and 0.2: median 0.2, mean 0.4.
  runtime::selection sel;
  sel.tokens = 3;
  sel.k = 2;
  sel.expert = {0, 1, 0, 1, 0, 1};
  sel.prob = {0.5f, 0.05f, 0.5f, 0.45f, 0.5f, 0.1f};
  sel.weight = sel.prob;
  sel.work.assign(6, runtime::pair_work::full);
  moe_layer m;
  std::vector<convert::routing_sample> samples{{&m, sel}};
  CHECK(convert::naee_beta(samples) == Approx(0.2f));
}

TEST_CASE("the contiguous placement puts consecutive experts in one group — expert e in group floor(e*D/E)") {
  CHECK(runtime::contiguous_placement(8, 4) == std::vector<index_t>{0, 0, 1, 1, 2, 2, 3, 3});
  CHECK(runtime::contiguous_placement(5, 2) == std::vector<index_t>{0, 0, 0, 1, 1});
  CHECK(runtime::contiguous_placement(3, 3) == std::vector<index_t>{0, 1, 2});
}
