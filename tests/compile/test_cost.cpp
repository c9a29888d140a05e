// kiln plan's cost model: pipeline stages make Llama-2-70B fit where no layout without them
// does, the bubble is 1F1B's (p-1)/(m+p-1), and sequence parallelism shortens the tensor-parallel
// collectives in bf16 and shrinks the activations.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "compile/cost.h"
#include "core/fs.h"
#include "fixture.h"
#include "model/config.h"

namespace kiln::compile {
namespace {

train::RunConfig model_config(const std::string& preset, int64_t seq_len = 4096) {
    train::RunConfig c;
    c.model = model::preset(preset);
    c.train.seq_len = seq_len;
    return c;
}

train::RunConfig layout(train::RunConfig c, int tp, int pp, bool sp, int64_t micro_batch,
                        int64_t grad_accum, const std::string& recompute) {
    c.tp = tp;
    c.pp = pp;
    c.sp = sp;
    c.train.micro_batch = micro_batch;
    c.train.grad_accum = grad_accum;
    c.train.recompute = recompute;
    return c;
}

TEST(Plan, Llama70BOnSixteenTrn1FitsOnlyWithPipelineStages) {
    const Cluster cluster = parse_cluster("16xtrn1.32xlarge");
    const std::vector<Estimate> all = candidates(model_config("llama2-70b"), cluster, 256);
    ASSERT_FALSE(all.empty());
    const Estimate& best = all.front();
    EXPECT_TRUE(best.fits);
    EXPECT_GT(best.pp, 1);
    EXPECT_LE(double(best.memory.total()), cluster.device.memory_gb * 1e9);
    EXPECT_EQ(best.dp * best.tp * best.pp, cluster.devices());
    // Without stages, every layout's replica of the weights, gradients and optimizer state is
    // too large for a 16 GB NeuronCore: PP is what makes it fit.
    EXPECT_TRUE(std::none_of(all.begin(), all.end(),
                             [](const Estimate& e) { return e.pp == 1 && e.fits; }));
    EXPECT_TRUE(std::any_of(all.begin(), all.end(), [](const Estimate& e) { return e.sp; }));
}

TEST(Plan, BubbleIsOneF1BsShareOfThePipelinedTime) {
    const Cluster cluster = parse_cluster("2xtrn1.32xlarge");  // 64 devices
    // Equal stages: 32 blocks split evenly, and a head too small to weigh on the last stage.
    train::RunConfig base = model_config("llama2-7b");
    base.model.vocab_size = 32;
    for (int p : {1, 2, 4, 8}) {
        for (int64_t m : {1, 4, 16, 32}) {
            const Estimate e = estimate(layout(base, 8, p, true, 1, m, "full"), cluster);
            const double expected = double(p - 1) / double(m + p - 1);
            EXPECT_NEAR(e.bubble, expected, 1e-4) << "pp " << p << ", " << m << " micro-batches";
            // The idle slots are that share of the pipelined part of the step (all but DP).
            EXPECT_NEAR(e.bubble_s / (e.step_s() - e.dp_s), e.bubble, 1e-12);
            EXPECT_EQ(e.pp_s > 0, p > 1);
        }
    }
    // A last stage made heavy by the head runs its micro-batches back to back while the lighter
    // first stage fills and drains the pipeline in less time: a smaller bubble than 1/(m+1).
    const Estimate tiny = estimate(layout(model_config("tiny", 256), 1, 2, false, 8, 4, "none"),
                                   parse_cluster("1xh200"));
    EXPECT_GT(tiny.bubble, 0);
    EXPECT_LT(tiny.bubble, 0.5 * 1.0 / 5.0);
}

TEST(Plan, StagesDivideTheComputePerDevice) {
    // The same replicas and batch on twice the devices, pipelined over 2 stages: each device
    // runs half the blocks (and the last the head, a little more).
    const train::RunConfig base = model_config("llama2-7b");
    const Estimate one =
        estimate(layout(base, 8, 1, true, 1, 16, "none"), parse_cluster("2xtrn1.32xlarge"));
    const Estimate two =
        estimate(layout(base, 8, 2, true, 1, 16, "none"), parse_cluster("4xtrn1.32xlarge"));
    ASSERT_EQ(one.dp, two.dp);
    EXPECT_GT(two.compute_s / one.compute_s, 0.5);
    EXPECT_LT(two.compute_s / one.compute_s, 0.52);
    EXPECT_NEAR(two.tp_s / one.tp_s, 0.5, 1e-9);
    EXPECT_LT(two.memory.params, one.memory.params);
    // 80 blocks over 32 stages are 2 or 3 a stage: the step waits for a stage of 3 (3/5 of one
    // of 16 stages' 5, the head aside), not 2.5.
    const train::RunConfig big = model_config("llama2-70b");
    const Estimate sixteen =
        estimate(layout(big, 8, 16, true, 1, 64, "full"), parse_cluster("8xtrn1.32xlarge"));
    const Estimate thirty_two =
        estimate(layout(big, 8, 32, true, 1, 64, "full"), parse_cluster("16xtrn1.32xlarge"));
    ASSERT_EQ(sixteen.dp, thirty_two.dp);
    EXPECT_GT(thirty_two.compute_s / sixteen.compute_s, 0.6);
    EXPECT_LT(thirty_two.compute_s / sixteen.compute_s, 0.63);
}

TEST(Plan, SequenceParallelismShortensBf16TensorParallelTimeAndActivations) {
    // The collectives in line with the products, so that their times compare their bytes
    // (BackwardSumsBeside... below has the backward's overlap).
    const Cluster cluster = parse_cluster("2xtrn1.32xlarge");
    train::RunConfig base = model_config("llama2-7b");  // bf16 on an accelerator
    base.tp_overlap = "false";
    const Estimate off = estimate(layout(base, 8, 1, false, 1, 32, "none"), cluster);
    const Estimate on = estimate(layout(base, 8, 1, true, 1, 32, "none"), cluster);
    // 4 fp32 reduce-scatters and 6 bf16 all-gathers carry 7/8 of 4 fp32 all-reduces' bytes.
    EXPECT_LT(on.tp_s, 0.9 * off.tp_s);
    EXPECT_GT(on.tp_s, 0.85 * off.tp_s);
    EXPECT_LT(on.memory.activations, off.memory.activations);
    EXPECT_GT(on.tokens_per_s, off.tokens_per_s);
    EXPECT_EQ(on.compute_s, off.compute_s);

    // In fp32 the gathers are as wide as the scatters, and SP's re-gathers in the backward make
    // it more traffic than the all-reduces it replaces: its gain there is memory alone.
    train::RunConfig fp32 = base;
    fp32.train.precision = "fp32";
    const Estimate off32 = estimate(layout(fp32, 8, 1, false, 1, 32, "none"), cluster);
    const Estimate on32 = estimate(layout(fp32, 8, 1, true, 1, 32, "none"), cluster);
    EXPECT_GT(on32.tp_s, off32.tp_s);
    EXPECT_LT(on32.memory.activations, off32.memory.activations);
}

TEST(Plan, RefusesLayoutsThatCannotRun) {
    const Cluster cluster = parse_cluster("2xtrn1.32xlarge");
    const train::RunConfig base = model_config("llama2-7b");
    EXPECT_NE(kiln::testing::message_of([&] {
                  estimate(layout(base, 1, 1, true, 1, 1, "none"), cluster);
              }).find("parallel.sp=true needs parallel.tp > 1"),
              std::string::npos);
    EXPECT_NE(kiln::testing::message_of([&] {
                  estimate(layout(base, 8, 3, false, 1, 1, "none"), cluster);
              }).find("parallel.pp=3"),
              std::string::npos);
}

// A GPU cluster's memory is the cuda backend's: its bf16 attention is fused and keeps O(T) a row,
// where the CPU's keeps the (T, T) probabilities, so the same layout on the same GPU plans less
// activation memory than sized as the CPU; a cluster file chooses with `backend`, and a backend
// kiln has no kernels of is refused in one sentence.
TEST(Plan, GpuClustersAreSizedWithTheCudaBackendsBuffers) {
    kiln::testing::TempDir dir;
    auto cluster_file = [&](const std::string& backend) {
        const std::string path = dir.path + "/" + backend + ".yaml";
        fs::write_file_replace(path,
                               "peak_tflops: 989\nmemory_gb: 141\nper_node: 8\n"
                               "intra_gbps: 450\nbackend: " +
                                   backend + "\n");
        return path;
    };
    const train::RunConfig run = layout(model_config("llama2-7b"), 1, 1, false, 1, 1, "none");
    const Estimate preset = estimate(run, parse_cluster("1xh200"));
    const Estimate cuda = estimate(run, parse_cluster(cluster_file("cuda")));
    const Estimate cpu = estimate(run, parse_cluster(cluster_file("cpu")));
    EXPECT_EQ(preset.memory.activations, cuda.memory.activations);
    // 32 layers of 32 heads' (4096, 4096) bf16 probabilities are 32 GiB alone.
    EXPECT_GT(cpu.memory.activations - cuda.memory.activations, int64_t(30) << 30);
    EXPECT_NE(kiln::testing::message_of([&] {
                  parse_cluster(cluster_file("neuron"));
              }).find("backend is cpu or cuda"),
              std::string::npos);
}

TEST(Plan, BackwardSumsBesideProductsShowOnlyWhatTheProductsCannotHide) {
    // Llama-2-7B in TP 8 without SP, f32 sums: 4 all-reduces a block and micro-batch, two of them
    // in the backward beside the weight gradient of qkv's and of w13's product.
    kiln::testing::TempDir dir;
    auto cluster = [&](double gbps) {
        const std::string path = dir.path + "/c.yaml";
        fs::write_file_replace(path, fmt::format("peak_tflops: 100\nmemory_gb: 1000\nper_node: "
                                                 "8\nintra_gbps: {}\nefficiency: 0.5\n",
                                                 gbps));
        return parse_cluster(path);
    };
    train::RunConfig run = layout(model_config("llama2-7b"), 8, 1, false, 1, 4, "none");
    run.train.precision = "bf16";
    run.tp_wire = "fp32";
    train::RunConfig in_line = run;
    in_line.tp_overlap = "false";
    // A link fast enough that each sum is shorter than its product: half the time shows.
    const Estimate fast = estimate(run, cluster(5000));
    const Estimate fast_serial = estimate(in_line, cluster(5000));
    EXPECT_NEAR(fast.tp_s, fast_serial.tp_s / 2, 1e-9 * fast_serial.tp_s);
    EXPECT_EQ(fast.compute_s, fast_serial.compute_s);
    // A link so slow that no product hides its sum: the products' time is what is saved.
    const Estimate slow = estimate(run, cluster(5));
    const Estimate slow_serial = estimate(in_line, cluster(5));
    const model::LlamaConfig& m = run.model;
    const double rows = 4096, products = 2 * rows * double(m.dim) *
                                         double(m.qkv_dim() + 2 * m.ffn_dim()) / (8 * 100e12 * 0.5);
    EXPECT_NEAR(slow_serial.tp_s - slow.tp_s, 4 * double(m.n_layers) * products,
                1e-9 * slow_serial.tp_s);
    // A host runs its collectives in line whatever parallel.tp_overlap says.
    Cluster host = cluster(5000);
    host.device.host = true;
    run.tp_overlap = "true";
    EXPECT_EQ(estimate(run, host).tp_s, estimate(in_line, host).tp_s);
}

}  // namespace
}  // namespace kiln::compile
