// The kiln binary end to end: train on a learnable stream, determinism of a rerun, resume equals
// an uninterrupted run, eval and export agreeing with the independent PyTorch reference, and bad
// input ending in one clear sentence with nothing overwritten.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/fs.h"
#include "data/shard.h"
#include "fixture.h"
#include "kernels/backends.h"

namespace kiln {
namespace {

using kiln::testing::TempDir;

using kiln::testing::kiln;
using kiln::testing::Result;

// A micro model that trains in a second.
const std::string kMicro =
    " --set model.dim=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2"
    " --set model.vocab_size=256 --set train.seq_len=32 --set train.micro_batch=8"
    " --set train.warmup_steps=5 --set train.lr=1e-2 --set train.min_lr=1e-3"
    " --set train.log_every=5 --set train.peak_gflops=100";

std::vector<nlohmann::json> metrics(const std::string& run) {
    std::vector<nlohmann::json> out;
    std::ifstream in(run + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);)
        out.push_back(nlohmann::json::parse(line));
    return out;
}

TEST(Cli, TrainLowersLossAndIsDeterministic) {
    TempDir dir;
    Result a = kiln("train" + kMicro + " --set train.steps=60 --set train.checkpoint_every=20" +
                    " --set train.keep_checkpoints=2 --set run.dir=" + (dir / "a"));
    ASSERT_EQ(a.rc, 0) << a.out;
    Result b = kiln("train" + kMicro + " --set train.steps=60 --set run.log_level=debug" +
                    " --set train.checkpoint_every=-1 --set run.dir=" + (dir / "b"));
    ASSERT_EQ(b.rc, 0) << b.out;
    auto ma = metrics(dir / "a"), mb = metrics(dir / "b");
    ASSERT_EQ(ma.size(), 60u);
    for (const char* key :
         {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s"}) {
        EXPECT_TRUE(ma[0].contains(key)) << key;
    }
    EXPECT_LT(ma.back()["loss"].get<double>(), 0.5 * ma.front()["loss"].get<double>());
    // The step's parts: each non-negative, together within the step's time.
    const double step_tokens = ma[1]["tokens"].get<double>() - ma[0]["tokens"].get<double>();
    for (const auto& m : ma) {
        double parts = 0;
        for (const char* key : {"compute_s", "wait_s", "reduce_s", "update_s"}) {
            ASSERT_TRUE(m.contains(key)) << key;
            EXPECT_GE(m[key].get<double>(), 0) << key;
            parts += m[key].get<double>();
        }
        EXPECT_GT(m["compute_s"].get<double>(), 0);
        EXPECT_LE(parts, 1.0001 * step_tokens / m["tokens_per_s"].get<double>()) << m.dump();
    }
    for (size_t i = 0; i < ma.size(); i++) {
        EXPECT_EQ(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>()) << "step " << i;
    }
    // The values, counted here from the documented definitions. lr: linear warmup over 5 steps
    // to 1e-2, then a cosine from 1e-2 (step 6) to 1e-3 (step 60).
    auto lr = [&](size_t i) { return ma[i]["lr"].get<double>(); };
    EXPECT_NEAR(lr(0), 1e-2 / 5, 1e-12);
    EXPECT_NEAR(lr(4), 1e-2, 1e-12);
    EXPECT_NEAR(lr(5), 1e-2, 1e-12);
    EXPECT_NEAR(lr(32), 1e-3 + 0.5 * (1e-2 - 1e-3), 1e-12);  // halfway: (32 - 5) / 54
    EXPECT_NEAR(lr(59), 1e-3, 1e-12);
    for (size_t i = 6; i < ma.size(); i++)
        EXPECT_LT(lr(i), lr(i - 1)) << "step " << i + 1;
    // tokens/s: the step's 8 x 32 tokens over its time, which holds its parts; MFU: the model's
    // FLOPs per token (6 per weight of every product, plus causal attention's 12 L C T) at
    // that rate over train.peak_gflops=100.
    const double C = 64, L = 2, H = 4, KV = 2, V = 256, T = 32, F = 192;  // F: 2/3 x 4C, x32
    const double weights = L * (2 * C * C + 2 * C * (C / H * KV) + 3 * C * F) + V * C;
    const double flops_per_token = 6 * weights + 12 * L * C * T;
    EXPECT_EQ(step_tokens, 8 * 32);
    for (const auto& m : ma) {
        const double tps = m["tokens_per_s"].get<double>();
        EXPECT_NEAR(m["mfu"].get<double>(), tps * flops_per_token / 100e9, 1e-9 * tps) << m.dump();
        EXPECT_GE(1 / tps, m["compute_s"].get<double>() / step_tokens) << m.dump();
    }
    const double elapsed = ma.back()["elapsed_s"].get<double>();
    double step_seconds = 0;
    for (const auto& m : ma)
        step_seconds += step_tokens / m["tokens_per_s"].get<double>();
    EXPECT_LE(step_seconds, 1.0001 * elapsed);  // the steps' times fit in the run's
    // At debug level each rank logs its step split at every step.
    EXPECT_NE(fs::read_file(dir / "b/rank-0.log").find("step 60: compute "), std::string::npos);
    EXPECT_EQ(fs::read_file(dir / "a/rank-0.log").find("step 60: compute "), std::string::npos);
    // train.keep_checkpoints=2: of the checkpoints at steps 20, 40 and 60, the newest two stay.
    EXPECT_TRUE(fs::exists(dir / "a/checkpoints/step-00000060/manifest.json"));
    EXPECT_TRUE(fs::exists(dir / "a/checkpoints/step-00000040/manifest.json"));
    EXPECT_FALSE(fs::exists(dir / "a/checkpoints/step-00000020"));
    // train.checkpoint_every=-1: none at all, and the last line says so.
    EXPECT_FALSE(fs::exists(dir / "b/checkpoints/step-00000060"));
    EXPECT_NE(b.out.find("no checkpoint (train.checkpoint_every=-1)"), std::string::npos) << b.out;
    EXPECT_TRUE(fs::exists(dir / "a/config.yaml"));
    EXPECT_NE(fs::read_file(dir / "a/status.json").find("finished"), std::string::npos);
}

TEST(Cli, ResumeMatchesUninterruptedRun) {
    TempDir dir;
    std::string common = "train" + kMicro + " --set train.checkpoint_every=10";
    ASSERT_EQ(kiln(common + " --set train.steps=20 --set run.dir=" + (dir / "full")).rc, 0);
    // Stop after 10 steps, then continue the same run to 20.
    ASSERT_EQ(kiln(common + " --set train.steps=20 --set run.dir=" + (dir / "cut")).rc, 0);
    std::filesystem::remove_all(dir / "cut/checkpoints/step-00000020");
    fs::write_file_atomic(dir / "cut/checkpoints/latest", std::string("step-00000010\n"));
    Result r = kiln(common + " --set train.steps=20 --set run.dir=" + (dir / "cut"));
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("resuming from"), std::string::npos);
    EXPECT_TRUE(fs::read_file(dir / "full/checkpoints/step-00000020/rank-00000.safetensors") ==
                fs::read_file(dir / "cut/checkpoints/step-00000020/rank-00000.safetensors"));
}

// A run asked for no more steps than its checkpoint has done. Fewer: refused in one sentence,
// nothing written (it once "trained 3 steps: loss 0.0000 -> 0.0000" and rewrote status.json and
// config.yaml to step 3 beside a checkpoint of step 6). As many: the finished run run again
// succeeds, says so, and rewrites nothing (it once wrote a loss of 0 into status.json).
TEST(Cli, ResumeAtOrPastTrainStepsTrainsNothingAndWritesNothing) {
    TempDir dir;
    const std::string run = dir / "run";
    const std::string common =
        "train" + kMicro + " --set train.checkpoint_every=2 --set run.dir=" + run;
    ASSERT_EQ(kiln(common + " --set train.steps=6").rc, 0);
    const std::vector<std::string> files = {"config.yaml", "status.json", "metrics.jsonl",
                                            "checkpoints/latest", "rank-0.log"};
    std::vector<std::string> before;
    for (const auto& f : files)
        before.push_back(fs::read_file(run + "/" + f));

    Result past = kiln(common + " --set train.steps=3");
    EXPECT_NE(past.rc, 0) << past.out;
    EXPECT_NE(past.out.find("kiln: " + run + " is already at step 6 (" + run +
                            "/checkpoints/step-00000006), past train.steps=3; raise train.steps "
                            "above 6 to train further"),
              std::string::npos)
        << past.out;
    EXPECT_EQ(std::count(past.out.begin(), past.out.end(), '\n'), 1) << past.out;

    Result same = kiln(common + " --set train.steps=6");
    EXPECT_EQ(same.rc, 0) << same.out;
    EXPECT_NE(same.out.find("nothing to train: " + run + " is already at step 6 = train.steps"),
              std::string::npos)
        << same.out;
    EXPECT_EQ(same.out.find("trained"), std::string::npos) << same.out;

    for (size_t i = 0; i < files.size(); i++)
        EXPECT_TRUE(fs::read_file(run + "/" + files[i]) == before[i]) << files[i] << " changed";
    EXPECT_FALSE(fs::exists(run + "/checkpoints/step-00000003"));
}

// Writes a shard set of `rows` random rows of T tokens below `vocab`.
void write_shards(const std::string& dir, int64_t rows, uint32_t T, int64_t vocab) {
    std::filesystem::create_directories(dir);
    std::vector<uint32_t> tokens(rows * T);
    uint64_t x = 88172645463325252ull;
    for (auto& t : tokens) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        t = static_cast<uint32_t>(x % vocab);
    }
    data::Manifest m;
    m.seq_len = T;
    m.vocab_size = vocab;
    m.token_bytes = 2;
    m.shards.push_back({"shard-00000.bin", uint64_t(rows),
                        data::write_shard(dir + "/shard-00000.bin", tokens, T, 2)});
    data::write_manifest(dir, m);
}

// train.precision=auto settles on this machine's products: bf16 only with native bf16 (capping
// oneDNN at AVX2 makes any CPU one without), written resolved into the config; an explicit bf16
// that the CPU lacks is one sentence and a non-zero exit, for train, eval and sample alike.
TEST(Cli, PrecisionAutoFollowsTheCpu) {
    TempDir dir;
    const std::string avx2 = "env ONEDNN_MAX_CPU_ISA=AVX2 " + kiln::testing::kiln_binary();
    auto run = [&](const std::string& cmd) {
        int rc = kiln::testing::run(cmd + " >" + (dir / "out") + " 2>&1");
        return Result{rc, fs::read_file(dir / "out")};
    };
    Result fp32 = run(avx2 + " train --check" + kMicro);
    ASSERT_EQ(fp32.rc, 0) << fp32.out;
    EXPECT_NE(fp32.out.find("precision: fp32"), std::string::npos) << fp32.out;
    Result bf16 = run(avx2 + " train --check --set train.precision=bf16");
    EXPECT_NE(bf16.rc, 0);
    EXPECT_EQ(bf16.out.rfind("kiln: train.precision=bf16: this CPU (", 0), 0u) << bf16.out;
    EXPECT_NE(bf16.out.find("has no bf16 matrix products"), std::string::npos) << bf16.out;
    EXPECT_EQ(bf16.out.find("internal error"), std::string::npos) << bf16.out;
    EXPECT_EQ(std::count(bf16.out.begin(), bf16.out.end(), '\n'), 1) << bf16.out;

    // A run under the cap trains in fp32 and says why; eval and sample refuse bf16 there too.
    Result t = run(avx2 + " train" + kMicro + " --set train.steps=2 --set run.dir=" + (dir / "r"));
    ASSERT_EQ(t.rc, 0) << t.out;
    EXPECT_NE(t.out.find("precision: fp32 products (auto: "), std::string::npos) << t.out;
    EXPECT_NE(fs::read_file(dir / "r/config.yaml").find("precision: fp32"), std::string::npos);
    for (const char* cmd : {" eval --data x --precision bf16 --checkpoint ",
                            " sample --tokenizer x --precision bf16 --checkpoint "}) {
        Result r = run(avx2 + cmd + (dir / "r"));
        EXPECT_NE(r.rc, 0) << cmd;
        EXPECT_NE(r.out.find("--precision=bf16: this CPU ("), std::string::npos) << r.out;
    }

    // Uncapped, auto settles too: bf16 exactly where this CPU has native bf16 products.
    Result here = run(kiln::testing::kiln_binary() + " train --check");
    ASSERT_EQ(here.rc, 0) << here.out;
    EXPECT_EQ(here.out.find("precision: auto"), std::string::npos) << here.out;
    if (!kiln::testing::without_bf16_products().empty()) {
        EXPECT_NE(here.out.find("precision: fp32"), std::string::npos) << here.out;
    }
}

// A checkpoint's manifest is checked against the model and files it describes: a shifted range
// (once a heap overflow in export), a tensor-parallel size of 0 (a division by zero) or -1, or a
// malformed checksum is one sentence, for export and eval alike.
TEST(Cli, TamperedCheckpointManifestIsOneSentence) {
    TempDir dir;
    write_shards(dir / "data", 4, 32, 256);
    ASSERT_EQ(kiln("train" + kMicro + " --set train.steps=2 --set run.dir=" + (dir / "run")).rc, 0);
    const std::string manifest = dir / "run/checkpoints/step-00000002/manifest.json";
    const std::string good = fs::read_file(manifest);
    auto tamper = [&](const std::function<void(nlohmann::json&)>& change) {
        nlohmann::json j = nlohmann::json::parse(good);
        change(j);
        fs::write_file_atomic(manifest, j.dump(2));
    };
    struct Case {
        std::function<void(nlohmann::json&)> change;
        std::string expect;
    } cases[] = {
        {[](nlohmann::json& j) { j["files"][0]["moments"][0] = 1000; },
         "do not hold its state exactly once"},
        {[](nlohmann::json& j) {
             j["files"][0]["moments"][0] = 100;
             j["files"][0]["moments"][1] = 100 + j["files"][0]["moments"][1].get<int64_t>();
         },
         "lie outside the model's"},
        {[](nlohmann::json& j) { j["layout"]["tp"] = 0; },
         "layout.tp=0 is not a tensor-parallel size"},
        {[](nlohmann::json& j) { j["layout"]["tp"] = -1; },
         "layout.tp=-1 is not a tensor-parallel size"},
        {[](nlohmann::json& j) { j["files"][0]["tp_rank"] = 3; },
         "tp_rank 3 is outside layout.tp=1"},
        {[](nlohmann::json& j) { j["files"][0]["xxh64"] = "zz"; },
         "xxh64 \"zz\" is not 16 hexadecimal"},
        {[](nlohmann::json& j) { j["files"][0]["params"] = false; },
         "do not hold its state exactly once"},
    };
    for (const auto& c : cases) {
        tamper(c.change);
        for (const std::string& cmd :
             {"export --checkpoint " + (dir / "run") + " --out " + (dir / "hf"),
              "eval --checkpoint " + (dir / "run") + " --data " + (dir / "data")}) {
            Result r = kiln(cmd);
            EXPECT_NE(r.rc, 0) << cmd;
            EXPECT_NE(r.out.find(c.expect), std::string::npos) << cmd << ": " << r.out;
            EXPECT_EQ(r.out.find("internal error"), std::string::npos) << r.out;
        }
    }
}

TEST(Cli, EvalAndExportAgreeWithPyTorch) {
    TempDir dir;
    write_shards(dir / "data", 6, 32, 256);
    Result t = kiln("train" + kMicro + " --set train.steps=5 --set data.source=" + (dir / "data") +
                    " --set run.dir=" + (dir / "run"));
    ASSERT_EQ(t.rc, 0) << t.out;
    Result e =
        kiln("eval --precision fp32 --checkpoint " + (dir / "run") + " --data " + (dir / "data"));
    ASSERT_EQ(e.rc, 0) << e.out;
    auto ej = nlohmann::json::parse(e.out.substr(e.out.find('{')));
    EXPECT_EQ(ej["tokens"].get<int64_t>(), 6 * 31);
    // The same checkpoint on a GPU, where there is one: the same loss to fp32 rounding; else one
    // sentence naming the option.
    Result g = kiln("eval --precision fp32 --backend cuda --checkpoint " + (dir / "run") +
                    " --data " + (dir / "data"));
    if (kernels::cuda_available()) {
        ASSERT_EQ(g.rc, 0) << g.out;
        auto gj = nlohmann::json::parse(g.out.substr(g.out.find('{')));
        EXPECT_NEAR(gj["loss"].get<double>(), ej["loss"].get<double>(),
                    1e-5 * ej["loss"].get<double>());
    } else {
        EXPECT_NE(g.rc, 0);
        EXPECT_NE(g.out.find("--backend=cuda: "), std::string::npos) << g.out;
        EXPECT_EQ(std::count(g.out.begin(), g.out.end(), '\n'), 1) << g.out;
    }
    Result x = kiln("export --checkpoint " + (dir / "run") + " --format hf --out " + (dir / "hf"));
    ASSERT_EQ(x.rc, 0) << x.out;
    auto config = nlohmann::json::parse(fs::read_file(dir / "hf/config.json"));
    EXPECT_EQ(config["architectures"][0], "LlamaForCausalLM");
    EXPECT_EQ(config["intermediate_size"], 192);  // 4*64*2/3 rounded up to 32
    if (!kiln::testing::have_torch())
        GTEST_SKIP() << "python3-torch is not installed";
    std::string cmd = "/usr/bin/python3 " + kiln::testing::source_dir() +
                      "/tests/reference/llama_ref.py eval-hf --hf-dir " + (dir / "hf") +
                      " --shard " + (dir / "data/shard-00000.bin") + " > " + (dir / "py.json");
    ASSERT_EQ(kiln::testing::run(cmd), 0);
    auto pj = nlohmann::json::parse(fs::read_file(dir / "py.json"));
    EXPECT_NEAR(pj["loss"].get<double>(), ej["loss"].get<double>(), 1e-4);
    EXPECT_EQ(pj["tokens"].get<int64_t>(), ej["tokens"].get<int64_t>());
    // bf16 export loads too, and is close.
    ASSERT_EQ(kiln("export --checkpoint " + (dir / "run") + " --out " + (dir / "hf16") +
                   " --dtype bfloat16")
                  .rc,
              0);
    cmd = "/usr/bin/python3 " + kiln::testing::source_dir() +
          "/tests/reference/llama_ref.py eval-hf --hf-dir " + (dir / "hf16") + " --shard " +
          (dir / "data/shard-00000.bin") + " > " + (dir / "py16.json");
    ASSERT_EQ(kiln::testing::run(cmd), 0);
    auto pj16 = nlohmann::json::parse(fs::read_file(dir / "py16.json"));
    EXPECT_NEAR(pj16["loss"].get<double>(), ej["loss"].get<double>(), 2e-2);
}

TEST(Cli, RunTrainsExportsAndReusesWhatIsDone) {
    TempDir dir;
    std::string args = "run --out " + (dir / "job") + kMicro + " --set model.vocab_size=400" +
                       " --set train.steps=12 --set train.checkpoint_every=6" +
                       " --corpus builtin:stories:3000 --set data.seq_len=32";
    Result r = kiln(args);
    ASSERT_EQ(r.rc, 0) << r.out;
    // Two ranks, the dashboard, samples, and the loss down.
    EXPECT_NE(r.out.find("dashboard: http://127.0.0.1:"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("[rank 1]"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("sample 3: "), std::string::npos) << r.out;
    auto m = metrics(dir / "job/train");
    ASSERT_EQ(m.size(), 12u);
    EXPECT_LT(m.back()["loss"].get<double>(), m.front()["loss"].get<double>());
    EXPECT_TRUE(fs::exists(dir / "job/config.yaml"));
    // Each rank's file holds the last logged step and that step's forward and backward time.
    for (int r = 0; r < 2; r++) {
        auto j = nlohmann::json::parse(
            fs::read_file(dir / ("job/train/ranks/rank-" + std::to_string(r) + ".json")));
        EXPECT_EQ(j["step"].get<int64_t>(), 12) << r;
        EXPECT_GT(j["compute_s"].get<double>(), 0) << r;
    }
    // kiln sample finds the run's tokenizer through its config.yaml.
    Result sampled = kiln("sample --checkpoint " + (dir / "job/train") + " --samples 2 --tokens 8");
    ASSERT_EQ(sampled.rc, 0) << sampled.out;
    EXPECT_NE(sampled.out.find("\n---\n"), std::string::npos) << sampled.out;
    // Temperature and top-k, on the ids each sample draws (each sample has its own seed).
    auto draws = [&](const std::string& options) {
        Result d = kiln("sample --checkpoint " + (dir / "job/train") +
                        " --ids --prompt 'Once upon a time' " + options);
        EXPECT_EQ(d.rc, 0) << d.out;
        std::vector<std::string> lines;
        std::istringstream in(d.out);
        for (std::string line; std::getline(in, line);)
            if (!line.empty() && line.find_first_not_of("0123456789 ") == std::string::npos)
                lines.push_back(line);
        return lines;
    };
    auto first_ids = [](const std::vector<std::string>& lines) {
        std::set<std::string> ids;
        for (const auto& l : lines)
            ids.insert(l.substr(0, l.find(' ')));
        return ids;
    };
    const auto greedy = draws("--temperature 0 --samples 3 --tokens 6");
    ASSERT_EQ(greedy.size(), 3u);
    EXPECT_EQ(greedy[0], greedy[1]);  // temperature 0 ignores the seed
    EXPECT_EQ(greedy[0], greedy[2]);
    for (const auto& line : draws("--temperature 5 --top-k 1 --samples 3 --tokens 6"))
        EXPECT_EQ(line, greedy[0]) << "top-k 1 is greedy at any temperature";
    EXPECT_EQ(draws("--temperature 1 --seed 7 --tokens 6"),
              draws("--temperature 1 --seed 7 --tokens 6"));
    // At temperature 100 the 400 pieces are nearly equally likely: 40 draws of the first token
    // give many different ones, unless top-k keeps 3, whose first is the greedy one.
    const auto all = first_ids(draws("--temperature 100 --samples 40 --tokens 1"));
    EXPECT_GT(all.size(), 10u);
    const auto top3 = first_ids(draws("--temperature 100 --top-k 3 --samples 40 --tokens 1"));
    EXPECT_LE(top3.size(), 3u);
    EXPECT_GE(top3.size(), 2u);
    EXPECT_TRUE(top3.count(greedy[0].substr(0, greedy[0].find(' '))));
    EXPECT_TRUE(fs::exists(dir / "job/hf/model.safetensors"));
    EXPECT_TRUE(fs::exists(dir / "job/hf/tokenizer.model"));
    EXPECT_TRUE(fs::exists(dir / "job/model.gguf"));
    EXPECT_TRUE(fs::exists(dir / "job/data/manifest.json"));
    EXPECT_TRUE(fs::exists(dir / "job/train/checkpoints/step-00000012/manifest.json"));
    Result again = kiln(args);
    ASSERT_EQ(again.rc, 0) << again.out;
    // The run's checkpoint is at train.steps already: nothing is loaded, trained or written.
    EXPECT_NE(again.out.find("nothing to train: "), std::string::npos) << again.out;
    EXPECT_EQ(again.out.find("step     "), std::string::npos) << "trained again:\n" << again.out;
}

TEST(Cli, DataPipelineAndItsGuards) {
    TempDir dir;
    std::string base = "data --corpus builtin:stories:1500 --set data.seq_len=32 --out ";
    Result a = kiln(base + (dir / "a") + " --train-tokenizer 400");
    ASSERT_EQ(a.rc, 0) << a.out;
    Result b = kiln(base + (dir / "b") + " --train-tokenizer 420");
    ASSERT_EQ(b.rc, 0) << b.out;
    Result v = kiln("data verify " + (dir / "a"));
    EXPECT_EQ(v.rc, 0) << v.out;
    EXPECT_NE(v.out.find("ok:"), std::string::npos);
    // Training on a's shards while declaring b's tokenizer is refused, naming both.
    std::string train = "train" + kMicro + " --set model.vocab_size=400 --set train.steps=2" +
                        " --set data.source=" + (dir / "a") + " --set run.dir=" + (dir / "run");
    Result mismatch = kiln(train + " --set data.tokenizer=" + (dir / "b/tokenizer.model"));
    EXPECT_NE(mismatch.rc, 0);
    EXPECT_NE(mismatch.out.find("was made with tokenizer"), std::string::npos) << mismatch.out;
    Result ok = kiln(train + " --set data.tokenizer=" + (dir / "a/tokenizer.model"));
    EXPECT_EQ(ok.rc, 0) << ok.out;
    // A tampered shard (same size): verify names it and training refuses it.
    {
        std::fstream f(dir / "a/shard-00000.bin", std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(200);
        f.put(char(1));
    }
    Result tampered = kiln("data verify " + (dir / "a"));
    EXPECT_NE(tampered.rc, 0);
    EXPECT_NE(tampered.out.find("shard-00000.bin: checksum"), std::string::npos) << tampered.out;
    Result refused_sum = kiln(train + " --set run.dir=" + (dir / "run3"));
    EXPECT_NE(refused_sum.rc, 0);
    EXPECT_NE(refused_sum.out.find("shard-00000.bin: checksum"), std::string::npos)
        << refused_sum.out;
    // A truncated shard: verify names it and training refuses it.
    std::filesystem::resize_file(dir / "a/shard-00000.bin", 1000);
    Result bad = kiln("data verify " + (dir / "a"));
    EXPECT_NE(bad.rc, 0);
    EXPECT_NE(bad.out.find("shard-00000.bin: file is 1000 bytes"), std::string::npos) << bad.out;
    Result refused = kiln(train + " --set run.dir=" + (dir / "run2"));
    EXPECT_NE(refused.rc, 0);
    EXPECT_NE(refused.out.find("shard-00000.bin"), std::string::npos) << refused.out;
    // Missing arguments and a malformed corpus line are one sentence each.
    Result none = kiln("data --out " + (dir / "c"));
    EXPECT_NE(none.out.find("needs --corpus and --out"), std::string::npos) << none.out;
    std::ofstream(dir / "bad.jsonl") << "{\"text\": \"fine\"}\nnot json\n";
    Result line = kiln("data --corpus " + (dir / "bad.jsonl") + " --tokenizer " +
                       (dir / "b/tokenizer.model") + " --out " + (dir / "c"));
    EXPECT_NE(line.rc, 0);
    EXPECT_NE(line.out.find("bad.jsonl:2: line is not valid JSON"), std::string::npos) << line.out;
}

// A tokenizer file is what every data set encoded with it depends on: training one over an
// existing file takes --force, and even then only a regular file is replaced.
TEST(Cli, TokenizerTrainKeepsAnExistingOutput) {
    TempDir dir;
    const std::string train =
        "tokenizer train --corpus builtin:stories:200 --vocab-size 400 --out ";
    fs::write_file_atomic(dir / "exist.model", std::string("keep me"));
    Result r = kiln(train + (dir / "exist.model"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find(dir / "exist.model exists; pass --force to replace it"), std::string::npos)
        << r.out;
    EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
    EXPECT_EQ(fs::read_file(dir / "exist.model"), "keep me");
    EXPECT_FALSE(fs::exists(dir / "exist.model.lines.tmp"));
    // A link is not replaced by a file, with --force or without; its target stays as it was.
    std::filesystem::create_symlink(dir / "exist.model", dir / "link.model");
    for (const std::string force : {"", " --force"}) {
        r = kiln(train + (dir / "link.model") + force);
        EXPECT_NE(r.rc, 0);
        EXPECT_NE(r.out.find(dir / "link.model is a symbolic link, not a regular file"),
                  std::string::npos)
            << r.out;
        EXPECT_TRUE(std::filesystem::is_symlink(dir / "link.model"));
    }
    EXPECT_EQ(fs::read_file(dir / "exist.model"), "keep me");
    ASSERT_EQ(::mkfifo((dir / "fifo.model").c_str(), 0644), 0);
    r = kiln(train + (dir / "fifo.model") + " --force");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find(dir / "fifo.model is a FIFO, not a regular file"), std::string::npos)
        << r.out;
    EXPECT_TRUE(std::filesystem::is_fifo(dir / "fifo.model"));
    r = kiln(train + (dir / "exist.model") + " --force");
    EXPECT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(fs::read_file(dir / "exist.model"), "keep me");
    EXPECT_NE(kiln("tokenizer train --help").out.find("--force"), std::string::npos);
}

// A float flag's range check must refuse NaN, which compares false with every bound.
TEST(Cli, NanFlagsAreRefused) {
    TempDir dir;
    const std::string cases[] = {
        "sample --checkpoint " + (dir / "none") + " --temperature nan",
        "plan --cluster 1xh200 --tokens nan",
        "launch -n 1 --grace nan -- true",
        "launch -n 1 --hang-timeout nan -- true",
    };
    for (const auto& args : cases) {
        Result r = kiln(args);
        EXPECT_NE(r.rc, 0) << args;
        EXPECT_NE(r.out.find("nan is not a "), std::string::npos) << args << "\n" << r.out;
    }
    Result inf = kiln("sample --checkpoint " + (dir / "none") + " --temperature inf");
    EXPECT_NE(inf.out.find("--temperature inf is not a temperature from 0 (greedy) to 100"),
              std::string::npos)
        << inf.out;
}

// Bad input: exit non-zero with one line naming the key or file; nothing overwritten.
TEST(Cli, BadInputIsOneClearSentence) {
    TempDir dir;
    std::ofstream(dir / "bad.yaml") << "train:\n  lr: -1\n";
    std::ofstream(dir / "unknown.yaml") << "train:\n  learning_rate: 1\n";
    // Aliases that repeat a section ten times over five levels: 100,000 values from 600 bytes.
    {
        std::ofstream laughs(dir / "laughs.yaml");
        laughs
            << "a0: &a0 {x0: 1, x1: 1, x2: 1, x3: 1, x4: 1, x5: 1, x6: 1, x7: 1, x8: 1, x9: 1}\n";
        for (int level = 1; level < 5; level++) {
            laughs << "a" << level << ": &a" << level << " {";
            for (int i = 0; i < 10; i++)
                laughs << (i ? ", " : "") << "y" << i << ": *a" << level - 1;
            laughs << "}\n";
        }
    }
    write_shards(dir / "data", 4, 32, 256);
    struct Case {
        std::string args, expect;
    } cases[] = {
        {"train --set model.n_heads=5", "model.dim=288 is not divisible by model.n_heads=5"},
        {"train --config " + (dir / "bad.yaml"), "train.lr=-1 is invalid: must be positive"},
        {"train --config " + (dir / "unknown.yaml"), "unknown config key 'train.learning_rate'"},
        {"train --set train.lr=abc", "train.lr=abc is not a finite number"},
        {"train --set data.source=" + (dir / "missing"), "no such folder"},
        {"train --set data.source=" + (dir / "data") + " --set train.seq_len=32",
         "vocab_size 256 but model.vocab_size is 32000"},
        {"train --set train.precision=fp16", "train.precision=fp16 is invalid"},
        {"train --check --set train.graphs=true",
         "train.graphs=true records device work, and train.backend=cpu runs each op as it is "
         "called"},
        {"train --check --config " + (dir / "laughs.yaml"), "holds more than 4096 values"},
        {"train --check --config /dev/zero", "/dev/zero is larger than the 1048576 bytes"},
        // Products of config values once overflowed into a SIGFPE after --check passed them.
        {"train --check --set train.micro_batch=36028797018963968",
         "train.micro_batch=36028797018963968 is over 1048576"},
        {"compile --set train.micro_batch=36028797018963968", "is over 1048576"},
        {"train --check --set model.dim=1099511627776", "model.dim=1099511627776 is over"},
        {"train --check --set train.micro_batch=1048576 --set train.seq_len=4096",
         "train.micro_batch x train.seq_len=4294967296 is over 2147483648"},
        {"eval --checkpoint " + (dir / "nope") + " --data " + (dir / "data"), "nope"},
    };
    for (const auto& c : cases) {
        Result r = kiln(c.args + " --set run.dir=" + (dir / "run"));
        if (c.args.rfind("eval", 0) == 0)
            r = kiln(c.args);
        EXPECT_NE(r.rc, 0) << c.args;
        EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << "\n" << r.out;
        EXPECT_EQ(r.out.find("terminate"), std::string::npos) << r.out;
        EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
    }
    // Tokenizer training: SentencePiece's refusals in kiln's words, without its source lines.
    const std::pair<std::string, std::string> tokenizer_cases[] = {
        {"--vocab-size 300 --out " + (dir / "t.model"), "ask for at least 3"},
        {"--vocab-size 32000 --out " + (dir / "t.model"), "more than this corpus yields"},
        {"--out " + dir.path, "is a folder; give the tokenizer file to write"},
    };
    for (const auto& [args, expect] : tokenizer_cases) {
        Result t = kiln("tokenizer train --corpus builtin:stories:1000 " + args);
        EXPECT_NE(t.rc, 0) << args;
        EXPECT_NE(t.out.find(expect), std::string::npos) << args << "\n" << t.out;
        EXPECT_EQ(t.out.find(".cc("), std::string::npos) << t.out;
    }
    EXPECT_FALSE(fs::exists(dir / "t.model"));
    // A checkpoint of another model in the run folder is refused, and left as it was.
    ASSERT_EQ(kiln("train" + kMicro + " --set train.steps=2 --set run.dir=" + (dir / "r2")).rc, 0);
    std::string before = fs::read_file(dir / "r2/checkpoints/step-00000002/rank-00000.safetensors");
    Result r = kiln("train" + kMicro +
                    " --set model.dim=128 --set train.steps=4 --set run.dir=" + (dir / "r2"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("different model"), std::string::npos) << r.out;
    EXPECT_TRUE(before ==
                fs::read_file(dir / "r2/checkpoints/step-00000002/rank-00000.safetensors"));
}

}  // namespace
}  // namespace kiln
