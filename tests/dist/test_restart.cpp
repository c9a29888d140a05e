// Failures and restarts with real processes: a rank killed at a random step, a hung rank, a
// damaged or half-written newest checkpoint. Each run must end by itself with the weights of a
// run that was never interrupted.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "core/fs.h"
#include "fixture.h"

namespace kiln {
namespace {

using kiln::testing::TempDir;

const std::string kModel =
    " --set model.dim=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2"
    " --set model.vocab_size=256 --set train.seq_len=32 --set train.micro_batch=4"
    " --set train.warmup_steps=5 --set train.lr=1e-2 --set train.min_lr=1e-3"
    " --set train.peak_gflops=100 --set train.checkpoint_every=5 --set train.keep_checkpoints=3"
    " --set parallel.timeout_s=20";

// The bytes of every rank file of a run's checkpoint, in rank order.
std::string weights(const std::string& run, int step) {
    char dir[64];
    std::snprintf(dir, sizeof dir, "/checkpoints/step-%08d", step);
    std::string all;
    for (int r = 0;; r++) {
        char name[64];
        std::snprintf(name, sizeof name, "/rank-%05d.safetensors", r);
        if (!fs::exists(run + dir + name))
            break;
        all += fs::read_file(run + dir + name);
    }
    return all;
}

int lines_of(const std::string& path) {
    std::ifstream in(path);
    int n = 0;
    for (std::string line; std::getline(in, line);)
        n++;
    return n;
}

std::vector<pid_t> children_of(pid_t pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
    std::vector<pid_t> out;
    for (pid_t c; in >> c;)
        out.push_back(c);
    return out;
}

bool has_env(pid_t pid, const std::string& kv) {
    std::string env = [&] {
        std::ifstream in("/proc/" + std::to_string(pid) + "/environ");
        std::stringstream s;
        s << in.rdbuf();
        return s.str();
    }();
    return ("\0" + env).find(std::string(1, '\0') + kv + '\0') != std::string::npos ||
           env.rfind(kv + '\0', 0) == 0;
}

bool alive(pid_t pid) {
    return ::kill(pid, 0) == 0;
}

TEST(Restart, KilledRankAtRandomStepEndsLikeAnUninterruptedRun) {
    TempDir dir;
    std::string kiln = kiln::testing::kiln_binary();
    std::string base = kiln + " launch -n 2 --max-failures 2 --hang-timeout 60 -- kiln train" +
                       kModel + " --set train.steps=30";
    ASSERT_EQ(kiln::testing::run(base + " --set run.dir=" + (dir / "full") + " >/dev/null 2>&1"),
              0);
    // The same run in the background; kill -9 rank 1 at a random step that is no checkpoint.
    std::string cut = dir / "cut";
    std::string cmd = base + " --set run.dir=" + cut + " >" + (dir / "cut.out") + " 2>&1 & echo $!";
    FILE* p = ::popen(cmd.c_str(), "r");
    pid_t launcher = 0;
    ASSERT_EQ(std::fscanf(p, "%d", &launcher), 1);
    ::pclose(p);
    // A new step each run, and the seed said, so that a failure can be rerun as it was:
    // KILN_TEST_SEED=N ctest -R KilledRank.
    const char* given = std::getenv("KILN_TEST_SEED");
    const unsigned seed =
        given ? unsigned(std::strtoul(given, nullptr, 10)) : std::random_device{}();
    SCOPED_TRACE("KILN_TEST_SEED=" + std::to_string(seed));
    std::printf("KILN_TEST_SEED=%u\n", seed);
    std::mt19937 rng(seed);
    int kill_after = 8 + int(rng() % 16);  // after the step-5 checkpoint is committed
    if (kill_after % 5 == 0)
        kill_after++;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (lines_of(cut + "/metrics.jsonl") < kill_after && alive(launcher) &&
           std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    bool killed = false;
    for (pid_t child : children_of(launcher)) {
        if (has_env(child, "RANK=1"))
            killed = ::kill(child, SIGKILL) == 0;
    }
    EXPECT_TRUE(killed) << "rank 1 not found after step " << kill_after;
    // The launcher is the shell's child, not ours (init reaps it): poll until it is gone.
    while (alive(launcher) &&
           std::chrono::steady_clock::now() < deadline + std::chrono::seconds(60)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    std::string out = fs::read_file(dir / "cut.out");
    EXPECT_NE(out.find("restarting the gang (restart 1 of 2)"), std::string::npos) << out;
    EXPECT_NE(out.find("resuming from"), std::string::npos) << out;
    EXPECT_NE(fs::read_file(cut + "/status.json").find("\"restarts\": 1"), std::string::npos);
    EXPECT_TRUE(weights(cut, 30) == weights(dir / "full", 30))
        << "killed after step " << kill_after;
}

// Ctrl-C (SIGINT) to kiln launch reaches every rank: the gang ends at once, every rank with it,
// and an interrupted gang is not restarted, however many failures it may take.
TEST(Restart, CtrlCReachesEveryRankAndEndsTheGang) {
    TempDir dir;
    std::string kiln = kiln::testing::kiln_binary();
    std::string cmd = kiln + " launch -n 2 --max-failures 2 -- kiln train" + kModel +
                      " --set train.steps=100000 --set run.dir=" + (dir / "run") + " >" +
                      (dir / "out") + " 2>&1 & echo $!";
    FILE* p = ::popen(cmd.c_str(), "r");
    pid_t launcher = 0;
    ASSERT_EQ(std::fscanf(p, "%d", &launcher), 1);
    ::pclose(p);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (lines_of(dir / "run/metrics.jsonl") < 3 && alive(launcher) &&
           std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::vector<pid_t> ranks = children_of(launcher);
    ASSERT_EQ(ranks.size(), 2u) << fs::read_file(dir / "out");
    ASSERT_EQ(::kill(launcher, SIGINT), 0);
    auto t0 = std::chrono::steady_clock::now();
    auto any_alive = [&] {
        bool any = alive(launcher);
        for (pid_t r : ranks)
            any = any || alive(r);
        return any;
    };
    while (any_alive() && std::chrono::steady_clock::now() < t0 + std::chrono::seconds(30))
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_FALSE(any_alive()) << "a rank or the launcher outlived Ctrl-C by 30 s";
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10);
    std::string out = fs::read_file(dir / "out");
    EXPECT_NE(out.find("interrupted by signal 2; stopped all 2 ranks"), std::string::npos) << out;
    EXPECT_EQ(out.find("restarting the gang"), std::string::npos) << out;
}

// The processes whose command line holds `marker`.
std::vector<pid_t> processes_with(const std::string& marker) {
    std::vector<pid_t> out;
    for (const auto& e : std::filesystem::directory_iterator("/proc")) {
        const std::string name = e.path().filename().string();
        if (name.find_first_not_of("0123456789") != std::string::npos)
            continue;
        std::ifstream in(e.path() / "cmdline");
        std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
        if (cmdline.find(marker) != std::string::npos)
            out.push_back(pid_t(std::stoi(name)));
    }
    return out;
}

// SIGTERM while the launcher is still starting ranks: it starts no more, stops those it started
// (a rank caught between fork and exec too), and exits non-zero at once; it once started every
// rank first, and a large -n kept it busy for a minute.
TEST(Restart, SigtermWhileStartingRanksStopsTheStartedOnes) {
    TempDir dir;
    // Seconds unique to this test process, so that its ranks are told from any others.
    const std::string marker = "30." + std::to_string(::getpid());
    const int n = 900;  // within a default limit of 1024 open files: a pipe each
    std::string cmd = kiln::testing::kiln_binary() + " launch -n " + std::to_string(n) +
                      " --grace 30 -- sleep " + marker + " >" + (dir / "out") + " 2>&1 & echo $!";
    FILE* p = ::popen(cmd.c_str(), "r");
    pid_t launcher = 0;
    ASSERT_EQ(std::fscanf(p, "%d", &launcher), 1);
    ::pclose(p);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (children_of(launcher).empty() && alive(launcher) &&
           std::chrono::steady_clock::now() < deadline)
        std::this_thread::yield();
    ASSERT_EQ(::kill(launcher, SIGTERM), 0);
    auto t0 = std::chrono::steady_clock::now();
    auto seconds = [&] {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    while (alive(launcher) && seconds() < 30)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_FALSE(alive(launcher)) << "the launcher outlived SIGTERM by 30 s";
    // --grace 30: the ranks went at SIGTERM, not at the SIGKILL that follows the grace.
    EXPECT_LT(seconds(), 10);
    const std::vector<pid_t> left = processes_with("sleep " + marker);
    for (pid_t r : left)
        ::kill(r, SIGKILL);
    EXPECT_TRUE(left.empty()) << left.size() << " rank(s) outlived the launcher";
    std::string out = fs::read_file(dir / "out");
    EXPECT_NE(out.find("kiln launch: interrupted by signal 15 while starting ranks; stopped the "),
              std::string::npos)
        << out;
    EXPECT_NE(out.find(" of " + std::to_string(n) + " started"), std::string::npos) << out;
}

TEST(Restart, HungRankIsStoppedAndTheGangRestarted) {
    std::string kiln = kiln::testing::kiln_binary();
    TempDir dir;
    // Rank 1 hangs (no heartbeat) on the first attempt only.
    std::string cmd = kiln + " launch -n 2 --max-failures 1 --hang-timeout 2 --grace 1 -- sh -c " +
                      "'if [ \"$RANK\" = 1 ] && [ \"$KILN_RESTARTS\" = 0 ]; then sleep 60; fi; " +
                      "echo attempt $KILN_RESTARTS done' >" + (dir / "out") + " 2>&1";
    auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(kiln::testing::run(cmd), 0);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::string out = fs::read_file(dir / "out");
    EXPECT_NE(out.find("rank 1 made no progress for 2 s; stopped all 2 ranks; restarting the gang"),
              std::string::npos)
        << out;
    EXPECT_NE(out.find("[rank 1] attempt 1 done"), std::string::npos) << out;
    EXPECT_LT(s, 30);
}

// A flipped byte or a cut file in the newest checkpoint, and a half-written one beside it: the
// run reports them, resumes from the previous good checkpoint, and ends where an uninterrupted
// run ends.
TEST(Restart, DamagedNewestCheckpointFallsBackToThePreviousOne) {
    // A constant learning rate after warmup, so that runs of 20 and 25 steps share their start.
    std::string kiln =
        kiln::testing::kiln_binary() + " train" + kModel + " --set train.decay=constant";
    TempDir dir;
    ASSERT_EQ(kiln::testing::run(kiln + " --set train.steps=25 --set run.dir=" + (dir / "full") +
                                 " >/dev/null 2>&1"),
              0);
    for (const char* damage : {"flip", "truncate"}) {
        std::string run = dir / damage;
        ASSERT_EQ(kiln::testing::run(kiln + " --set train.steps=20 --set run.dir=" + run +
                                     " >/dev/null 2>&1"),
                  0);
        std::string newest = run + "/checkpoints/step-00000020/rank-00000.safetensors";
        if (std::string(damage) == "flip") {
            std::fstream f(newest, std::ios::in | std::ios::out | std::ios::binary);
            f.seekp(5000);
            char c;
            f.get(c);
            f.seekp(5000);
            f.put(char(c ^ 1));
        } else {
            std::filesystem::resize_file(newest, 4000);
        }
        // A checkpoint whose write was cut short: never renamed into place.
        std::filesystem::create_directories(run + "/checkpoints/.tmp-step-00000025");
        std::ofstream(run + "/checkpoints/.tmp-step-00000025/rank-00000.safetensors") << "partial";
        TempDir tmp;
        int rc = kiln::testing::run(kiln + " --set train.steps=25 --set run.dir=" + run + " >" +
                                    (tmp / "out") + " 2>&1");
        std::string out = fs::read_file(tmp / "out");
        ASSERT_EQ(rc, 0) << out;
        EXPECT_NE(out.find("skipping a damaged checkpoint"), std::string::npos) << out;
        EXPECT_NE(out.find("step-00000020"), std::string::npos) << out;
        EXPECT_NE(out.find("resuming from " + run + "/checkpoints/step-00000015"),
                  std::string::npos)
            << out;
        EXPECT_TRUE(weights(run, 25) == weights(dir / "full", 25)) << damage;
    }
}

// Every checkpoint damaged is not a fresh run: the run is refused, in one sentence naming the
// run folder, and the damaged files stay as they were for a repair (a fresh start from step 0
// once overwrote them and exited 0).
TEST(Restart, EveryCheckpointDamagedIsRefusedAndLeftAlone) {
    TempDir dir;
    const std::string run = dir / "run";
    const std::string kiln = kiln::testing::kiln_binary() + " train" + kModel +
                             " --set train.checkpoint_every=2 --set run.dir=" + run;
    ASSERT_EQ(kiln::testing::run(kiln + " --set train.steps=4 >/dev/null 2>&1"), 0);
    std::vector<std::string> files;
    for (int step : {2, 4}) {
        char name[80];
        std::snprintf(name, sizeof name, "/checkpoints/step-%08d/rank-00000.safetensors", step);
        files.push_back(run + name);
        std::filesystem::resize_file(files.back(), 1000);
    }
    files.insert(files.end(), {run + "/checkpoints/latest", run + "/config.yaml",
                               run + "/status.json", run + "/metrics.jsonl"});
    std::vector<std::string> before;
    for (const auto& f : files)
        before.push_back(fs::read_file(f));

    int rc = kiln::testing::run(kiln + " --set train.steps=6 >" + (dir / "out") + " 2>&1");
    std::string out = fs::read_file(dir / "out");
    EXPECT_NE(rc, 0) << out;
    EXPECT_NE(out.find("kiln: every checkpoint in " + run + " is damaged (2 of them; the newest: " +
                       run + "/checkpoints/step-00000004/rank-00000.safetensors is 1000 bytes"),
              std::string::npos)
        << out;
    EXPECT_NE(out.find("move " + run + "/checkpoints aside to start over"), std::string::npos)
        << out;
    EXPECT_EQ(out.find("step      1/"), std::string::npos) << out;  // no step ran
    for (size_t i = 0; i < files.size(); i++)
        EXPECT_TRUE(fs::read_file(files[i]) == before[i]) << files[i] << " changed";
    EXPECT_FALSE(fs::exists(run + "/checkpoints/step-00000006"));
}

}  // namespace
}  // namespace kiln

namespace kiln {
namespace {

// Non-finite steps are skipped and counted; five in a row stop the run with one sentence naming
// the last checkpoint written while training was healthy, and no checkpoint of the bad state.
TEST(Restart, DivergenceStopsAndKeepsTheLastGoodCheckpoint) {
    TempDir dir;
    std::string cmd = kiln::testing::kiln_binary() + " train" + kModel +
                      " --set train.lr=1e30 --set train.grad_clip=0 --set train.warmup_steps=0" +
                      " --set train.min_lr=0 --set train.steps=40 --set train.checkpoint_every=1" +
                      " --set run.dir=" + (dir / "run") + " >" + (dir / "out") + " 2>&1";
    EXPECT_NE(kiln::testing::run(cmd), 0);
    std::string out = fs::read_file(dir / "out");
    EXPECT_NE(out.find("kiln: training diverged: 5 steps in a row had a non-finite loss"),
              std::string::npos)
        << out;
    EXPECT_NE(fs::read_file(dir / "run/status.json").find("\"failed\""), std::string::npos);
    // Each step's line counts the skipped ones; the fifth ends the run before its line.
    std::ifstream metrics(dir / "run/metrics.jsonl");
    std::string line, last;
    while (std::getline(metrics, line))
        last = line;
    EXPECT_NE(last.find("\"skipped_steps\":4"), std::string::npos) << last;
    // Checkpoints stop with the first skipped step; the message names the last one.
    int first_bad = std::stoi(last.substr(last.find("\"step\":") + 7)) - 3;
    char name[32];
    std::snprintf(name, sizeof name, "step-%08d", first_bad - 1);
    EXPECT_NE(out.find(std::string("the last checkpoint before it is ") + (dir / "run") +
                       "/checkpoints/" + name),
              std::string::npos)
        << out;
    std::snprintf(name, sizeof name, "step-%08d", first_bad);
    EXPECT_FALSE(fs::exists(dir / ("run/checkpoints/" + std::string(name))));
}

}  // namespace
}  // namespace kiln
