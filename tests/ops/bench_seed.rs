//! The benchmark table's forward+backward starts from the output's gradient as torch's
//! `o.backward(d_o)` does (`benches/common/mod.rs`, `backward_with`): its gradients must be the
//! ones the longer spelling `(o · d_o).sum().backward()` gives.

#[allow(dead_code)]
#[path = "../../benches/common/mod.rs"]
mod bench_common;

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor};

use crate::common::backends::NdArray;

#[test]
fn backward_with_matches_the_summed_product() {
    type A = Autodiff<NdArray>;
    let device = Default::default();
    let dist = Distribution::Normal(0.0, 1.0);
    let x = Tensor::<A, 4>::random([2, 3, 4, 5], dist, &device).require_grad();
    let y = Tensor::<A, 4>::random([2, 3, 4, 5], dist, &device).require_grad();
    let d_o = Tensor::<NdArray, 4>::random([2, 3, 4, 5], dist, &device);
    let f = |x: &Tensor<A, 4>, y: &Tensor<A, 4>| x.clone().exp() * y.clone() + x.clone();

    let seeded = bench_common::backward_with(f(&x, &y), d_o.clone());
    let summed = (f(&x, &y) * Tensor::<A, 4>::from_inner(d_o))
        .sum()
        .backward();
    for t in [&x, &y] {
        let a = t.grad(&seeded).expect("a gradient through the seed");
        let b = t.grad(&summed).expect("a gradient through the sum");
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), burn::tensor::Tolerance::absolute(1e-6));
    }
}
