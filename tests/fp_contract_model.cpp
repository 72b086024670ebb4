// The fp_contract probe's MoE model, in a file of its own compiled once for
// both builds of the probe: std::normal_distribution, which draws its
// weights, has multiply-adds of its own that the flags under test change.
#include "support/everything_model.hpp"

namespace moeforge::test {

model::weights fp_contract_model() { return everything_model(); }

}  // namespace moeforge::test
