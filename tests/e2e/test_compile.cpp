// kiln compile and kiln plan: the memory plan against the peak memory real runs reach, the
// refusal of a run that cannot fit, the dry run's report, and the planner's bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>

#include "core/fs.h"
#include "fixture.h"

namespace kiln {
namespace {

using json = nlohmann::json;
using kiln::testing::TempDir;

struct Result {
    int rc;
    std::string out;
};

Result kiln(const std::string& args) {
    TempDir tmp;
    std::string cmd = kiln::testing::kiln_binary() + " " + args + " >" + (tmp / "out") + " 2>&1";
    int rc = kiln::testing::run(cmd);
    return {rc, fs::read_file(tmp / "out")};
}

// The plan a run printed ("memory plan per rank: N MiB") and the highest peak resident memory
// its ranks reported (ranks/rank-N.json).
std::pair<double, double> plan_and_peak(const Result& r, const std::string& run) {
    std::smatch m;
    double plan = 0, peak = 0;
    if (std::regex_search(r.out, m, std::regex("memory plan per rank: ([0-9]+) MiB")))
        plan = std::stod(m[1]);
    for (const auto& e : std::filesystem::directory_iterator(run + "/ranks")) {
        json j = json::parse(fs::read_file(e.path().string()));
        peak = std::max(peak, j["peak_rss_bytes"].get<double>() / 1048576.0);
    }
    return {plan, peak};
}

TEST(Compile, MemoryPlanIsWithinTenPercentOfThePeak) {
    TempDir dir;
    const std::string common =
        " --set train.steps=3 --set train.checkpoint_every=2 --set train.peak_gflops=100";
    struct Case {
        const char* name;
        int ranks;
        std::string sets;
    };
    const Case cases[] = {
        {"tiny", 1, " --set model.preset=tiny"},
        {"tiny-full", 1, " --set model.preset=tiny --set train.recompute=full"},
        {"tiny-dp2", 2, " --set model.preset=tiny"},
        {"tiny-dp2-nozero", 2, " --set model.preset=tiny --set parallel.zero=0"},
        {"tiny-tp2", 2, " --set model.preset=tiny --set parallel.tp=2"},
        {"small-selective", 1,
         " --set model.preset=small --set train.recompute=selective --set train.micro_batch=4"},
    };
    for (const Case& c : cases) {
        std::string run = dir / c.name;
        std::string train = "train" + c.sets + common + " --set run.dir=" + run;
        Result r = c.ranks == 1
                       ? kiln(train)
                       : kiln("launch -n " + std::to_string(c.ranks) + " -- kiln " + train);
        ASSERT_EQ(r.rc, 0) << c.name << ": " << r.out;
        auto [plan, peak] = plan_and_peak(r, run);
        ASSERT_GT(plan, 0) << c.name << ": " << r.out;
        EXPECT_NEAR(plan, peak, 0.10 * peak)
            << c.name << ": plan " << plan << " MiB, peak " << peak << " MiB";
    }
}

TEST(Compile, RefusesAPlanThatCannotFitBeforeAllocating) {
    TempDir dir;
    Result r =
        kiln("train --set model.preset=small --set train.memory_limit_gb=0.5 --set run.dir=" +
             (dir / "run"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("a rank may use 0.50 GiB (train.memory_limit_gb)"), std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("set train.recompute=selective or full"), std::string::npos) << r.out;
    EXPECT_FALSE(std::filesystem::exists(dir / "run/metrics.jsonl"));
    Result c = kiln(
        "compile --set model.preset=llama2-7b --set train.seq_len=4096 "
        "--set train.memory_limit_gb=16");
    EXPECT_NE(c.rc, 0);
    EXPECT_NE(c.out.find("activations + workspace"), std::string::npos) << c.out;
    EXPECT_NE(c.out.find("but a rank may use 16.00 GiB"), std::string::npos) << c.out;
}

TEST(Compile, DryRunReportsAndForecasts) {
    TempDir dir;
    Result r = kiln(
        "compile --ranks 2 --dry-steps 3 --set model.dim=64 --set model.n_layers=2 "
        "--set model.n_heads=4 --set model.n_kv_heads=2 --set model.vocab_size=256 "
        "--set train.seq_len=32 --set train.steps=1000 --set run.dir=" +
        (dir / "run"));
    ASSERT_EQ(r.rc, 0) << r.out;
    json report = json::parse(fs::read_file(dir / "run/compile.json"));
    EXPECT_EQ(report["ranks"], 2);
    EXPECT_EQ(report["dp"], 2);
    EXPECT_GT(report["dry_run"]["tokens_per_s"].get<double>(), 0);
    EXPECT_GT(report["dry_run"]["peak_rss_bytes"].get<double>(), 0);
    EXPECT_GT(report["dry_run"]["forecast_s"].get<double>(), 0);
    EXPECT_GT(report["memory_plan_bytes"]["total"].get<double>(), 0);
    EXPECT_NE(r.out.find("forecast: 1000 steps"), std::string::npos) << r.out;
    // The dry run leaves no run of its own behind: the run folder holds only the report.
    EXPECT_FALSE(std::filesystem::exists(dir / "run/metrics.jsonl"));
}

TEST(Plan, RecommendsALayoutAndRefusesBadInput) {
    Result r = kiln("plan --model llama2-7b --cluster 2xtrn1.32xlarge --tokens 1e10");
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("recommended: --set parallel.tp="), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("on 64 ranks"), std::string::npos) << r.out;

    Result unknown = kiln("plan --cluster 2xfoo");
    EXPECT_NE(unknown.rc, 0);
    EXPECT_NE(unknown.out.find("unknown accelerator \"foo\""), std::string::npos) << unknown.out;
    Result layout = kiln("plan --cluster 2xh200 --fixed --set parallel.tp=3");
    EXPECT_NE(layout.rc, 0);
    EXPECT_NE(layout.out.find("parallel.tp=3"), std::string::npos) << layout.out;
    Result big = kiln("plan --model llama2-70b --cluster 1xtrn1.32xlarge");
    EXPECT_NE(big.rc, 0);
    EXPECT_NE(big.out.find("no layout fits 16 GB per device"), std::string::npos) << big.out;
    TempDir dir;
    std::string file = dir / "cluster.yaml";
    fs::write_file_atomic(file,
                          std::string("name: lab\npeak_tflops: 100\nmemory_gb: 0\nper_node: 4\n"));
    Result bad = kiln("plan --cluster " + file);
    EXPECT_NE(bad.rc, 0);
    EXPECT_NE(bad.out.find("memory_gb must be positive"), std::string::npos) << bad.out;
}

}  // namespace
}  // namespace kiln
