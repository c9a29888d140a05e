// Ranks and clients on two "hosts": Linux network namespaces joined by a veth pair, each with a
// host name of its own (a UTS namespace) that resolves nowhere, as in many containers. Needs root
// and iproute2; skipped, with the reason, where the namespaces cannot be made.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "fixture.h"
#include "launch/supervisor.h"

namespace kiln {
namespace {

using kiln::testing::TempDir;

// Two namespaces, `<tag>a` at 10.<x>.<y>.1 and `<tag>b` at .2, removed at destruction.
struct TwoHosts {
    std::string tag = "kt" + std::to_string(::getpid() % 100000);
    std::string net = fmt::format("10.{}.{}", 100 + ::getpid() % 100, ::getpid() / 100 % 250);
    std::string why;  // non-empty: the hosts could not be made

    TwoHosts() {
        if (::geteuid() != 0) {
            why = "needs root to make network namespaces";
            return;
        }
        const std::string a = tag + "a", b = tag + "b";
        const std::string script = fmt::format(
            "ip netns add {0} && ip netns add {1} && "
            "ip link add {0}v type veth peer name {1}v && "
            "ip link set {0}v netns {0} && ip link set {1}v netns {1} && "
            "ip -n {0} addr add {2}.1/24 dev {0}v && ip -n {1} addr add {2}.2/24 dev {1}v && "
            "ip -n {0} link set {0}v up && ip -n {1} link set {1}v up && "
            "ip -n {0} link set lo up && ip -n {1} link set lo up",
            a, b, net);
        if (kiln::testing::run("(" + script + ") >/dev/null 2>&1") != 0)
            why = "cannot make network namespaces and a veth pair here (ip netns, ip link)";
    }
    ~TwoHosts() {
        kiln::testing::run("ip netns del " + tag + "a >/dev/null 2>&1; ip netns del " + tag +
                           "b >/dev/null 2>&1");
    }
    std::string address(char host) const { return net + (host == 'a' ? ".1" : ".2"); }
    // A shell line that runs `command` on `host` (a or b) under a host name of its own, in the
    // background: its output goes to `log`, its exit status to `log`.rc.
    std::string on(char host, const std::string& command, const std::string& log) const {
        return fmt::format(
            "(ip netns exec {}{} unshare --uts sh -c \"hostname kiln-host-{} && exec {}\" "
            ">{} 2>&1; echo $? >{}.rc) &\n",
            tag, host, host, command, log, log);
    }
};

// Runs a bash script made of `lines` (saved as `path`) for at most `seconds`; its exit status.
int script(const std::string& path, const std::string& lines, int seconds) {
    fs::write_file_atomic(path, "set -u\n" + lines);
    return kiln::testing::run(fmt::format("timeout {} bash {} >{}.out 2>&1", seconds, path, path));
}

int status_of(const std::string& log) {
    return std::stoi(fs::read_file(log + ".rc"));
}

std::vector<double> losses(const std::string& run) {
    std::vector<double> out;
    std::ifstream in(run + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);)
        out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
    return out;
}

const std::string kTrain =
    "kiln train --set model.dim=64 --set model.n_layers=2 --set model.n_heads=4 "
    "--set model.n_kv_heads=2 --set model.vocab_size=256 --set train.seq_len=32 "
    "--set train.micro_batch=4 --set train.steps=6 --set train.peak_gflops=100 "
    "--set train.precision=fp32 --set parallel.timeout_s=30";

// A rank per core, as `kiln launch -n 2` gives the loopback runs the curves are compared with:
// products split over another thread count may round differently (oneDNN's AVX2 ones do).
const std::string kOneThread = "env OMP_NUM_THREADS=1 ";

// Rank 0 on one host, rank 1 on the other, by torchrun's variables; neither host's name resolves.
// Each rank listens on its own address toward MASTER_ADDR, and the pair trains the same curve as
// two ranks on loopback.
TEST(TwoHosts, DataParallelRanksConnectWhereHostNamesDoNotResolve) {
    TwoHosts hosts;
    if (!hosts.why.empty())
        GTEST_SKIP() << hosts.why;
    TempDir dir;
    const std::string kiln = kiln::testing::kiln_binary();
    const std::string train = kiln + kTrain.substr(4) + " --set run.dir=" + (dir / "two-hosts");
    const int port = launch::free_port();
    std::string lines;
    for (int r = 0; r < 2; r++) {
        const std::string env =
            fmt::format("env WORLD_SIZE=2 RANK={} MASTER_ADDR={} MASTER_PORT={} {}", r,
                        hosts.address('a'), port, kOneThread);
        lines += hosts.on(r == 0 ? 'a' : 'b', env + train, dir / ("rank" + std::to_string(r)));
    }
    ASSERT_EQ(script(dir / "ranks.sh", lines + "wait\n", 180), 0);
    for (int r = 0; r < 2; r++) {
        const std::string log = dir / ("rank" + std::to_string(r));
        EXPECT_EQ(status_of(log), 0) << fs::read_file(log);
        EXPECT_NE(fs::read_file(log).find("through TCP on " + hosts.address(r == 0 ? 'a' : 'b')),
                  std::string::npos)
            << fs::read_file(log);
    }
    const std::string loopback = dir / "loopback";
    ASSERT_EQ(kiln::testing::run(kiln + " launch -n 2 -- " + kTrain +
                                 " --set parallel.transport=tcp --set run.dir=" + loopback + " >" +
                                 (dir / "loopback.log") + " 2>&1"),
              0)
        << fs::read_file(dir / "loopback.log");
    const auto a = losses(dir / "two-hosts"), b = losses(loopback);
    ASSERT_EQ(a.size(), 6u);
    EXPECT_EQ(a, b);

    // An interface that is not there is one sentence, before any rendezvous.
    const std::string bad = dir / "bad";
    const std::string env = fmt::format(
        "env WORLD_SIZE=2 RANK=1 MASTER_ADDR={} MASTER_PORT={} GLOO_SOCKET_IFNAME=eth9 ",
        hosts.address('a'), port);
    ASSERT_EQ(script(dir / "bad.sh", hosts.on('b', env + train, bad) + "wait\n", 60), 0);
    EXPECT_NE(status_of(bad), 0);
    EXPECT_NE(fs::read_file(bad).find("network interface \"eth9\" (GLOO_SOCKET_IFNAME or "
                                      "parallel.interface) does not exist on kiln-host-b"),
              std::string::npos)
        << fs::read_file(bad);
}

// kiln launch on each host (--nnodes 2), one rank each. The link between the hosts goes down
// mid-run for longer than --hang-timeout: both hosts' agents notice, stop their ranks, and when
// the link is back the gang restarts from the newest checkpoint and ends with the loss of a run
// that was never cut.
TEST(TwoHosts, APartitionedHostIsDetectedAndTheGangRestarts) {
    TwoHosts hosts;
    if (!hosts.why.empty())
        GTEST_SKIP() << hosts.why;
    TempDir dir;
    const std::string kiln = kiln::testing::kiln_binary();
    const std::string steps =
        " --set train.steps=100 --set train.checkpoint_every=10 --set train.log_every=50"
        " --set train.autotune=false";
    const std::string run = dir / "run";
    const int port = launch::free_port();
    std::string lines;
    for (int node = 0; node < 2; node++) {
        const std::string launch = fmt::format(
            "{}{} launch --nnodes 2 --node-rank {} --master-addr {} --master-port {} -n 1 "
            "--max-failures 2 --hang-timeout 4 --grace 2 -- {}{} --set run.dir={}",
            kOneThread, kiln, node, hosts.address('a'), port, kTrain, steps, run);
        lines += hosts.on(node == 0 ? 'a' : 'b', launch, dir / ("node" + std::to_string(node)));
    }
    lines += fmt::format(
        "for i in $(seq 6000); do [ -f {0}/metrics.jsonl ] && "
        "[ $(wc -l <{0}/metrics.jsonl) -ge 25 ] && break; sleep 0.01; done\n"
        "ip -n {1}b link set {1}bv down\nsleep 8\nip -n {1}b link set {1}bv up\nwait\n",
        run, hosts.tag);
    ASSERT_EQ(script(dir / "partition.sh", lines, 240), 0)
        << fs::read_file(dir / "partition.sh.out");
    for (int node = 0; node < 2; node++) {
        const std::string log = fs::read_file(dir / ("node" + std::to_string(node)));
        EXPECT_EQ(status_of(dir / ("node" + std::to_string(node))), 0) << log;
        EXPECT_NE(log.find("restarting the gang (restart 1 of 2)"), std::string::npos) << log;
    }
    const std::string why = fs::read_file(dir / "node0") + fs::read_file(dir / "node1");
    EXPECT_TRUE(why.find("was silent for") != std::string::npos ||
                why.find("made no progress for") != std::string::npos)
        << why;

    const std::string loopback = dir / "loopback";
    ASSERT_EQ(kiln::testing::run(kiln + " launch -n 2 -- " + kTrain + steps +
                                 " --set parallel.transport=tcp --set run.dir=" + loopback + " >" +
                                 (dir / "loopback.log") + " 2>&1"),
              0)
        << fs::read_file(dir / "loopback.log");
    const auto cut = losses(run), whole = losses(loopback);
    ASSERT_EQ(whole.size(), 100u);
    ASSERT_GT(cut.size(), 100u);  // metrics.jsonl appends: the steps after the checkpoint again
    EXPECT_EQ(cut.back(), whole.back());
}

// The same two hosts with 50 ms of round trip and 1% loss between them (tc netem, 25 ms and
// 0.5% each way): the gang trains the loopback curve, step for step.
TEST(TwoHosts, DelayAndLossLeaveTheCurveAsItWas) {
    TwoHosts hosts;
    if (!hosts.why.empty())
        GTEST_SKIP() << hosts.why;
    for (char h : {'a', 'b'})
        if (kiln::testing::run(fmt::format("ip netns exec {0}{1} tc qdisc add dev {0}{1}v root "
                                           "netem delay 25ms loss 0.5% >/dev/null 2>&1",
                                           hosts.tag, h)) != 0)
            GTEST_SKIP() << "this kernel has no netem queueing discipline (sch_netem): "
                            "tc qdisc add ... netem failed";
    TempDir dir;
    const std::string kiln = kiln::testing::kiln_binary();
    const int port = launch::free_port();
    std::string lines;
    for (int node = 0; node < 2; node++)
        lines += hosts.on(
            node == 0 ? 'a' : 'b',
            fmt::format("{}{} launch --nnodes 2 --node-rank {} --master-addr {} "
                        "--master-port {} -n 1 -- {} --set run.dir={}",
                        kOneThread, kiln, node, hosts.address('a'), port, kTrain, dir / "run"),
            dir / ("node" + std::to_string(node)));
    ASSERT_EQ(script(dir / "netem.sh", lines + "wait\n", 240), 0);
    for (int node = 0; node < 2; node++)
        EXPECT_EQ(status_of(dir / ("node" + std::to_string(node))), 0)
            << fs::read_file(dir / ("node" + std::to_string(node)));
    const std::string loopback = dir / "loopback";
    ASSERT_EQ(kiln::testing::run(kiln + " launch -n 2 -- " + kTrain +
                                 " --set parallel.transport=tcp --set run.dir=" + loopback +
                                 " >/dev/null 2>&1"),
              0);
    EXPECT_EQ(losses(dir / "run"), losses(loopback));
}

// A head on one host, a client on the other: off loopback the head needs its token, and a job
// submitted with it runs.
TEST(TwoHosts, RemoteClientNeedsTheHeadsToken) {
    TwoHosts hosts;
    if (!hosts.why.empty())
        GTEST_SKIP() << hosts.why;
    TempDir dir;
    const std::string kiln = kiln::testing::kiln_binary();
    const std::string token = "kiln-two-hosts-secret-0123456789";
    const std::string head = fmt::format("http://{}:8265", hosts.address('a'));
    const std::string serve =
        kiln + " serve --host " + hosts.address('a') + " --runs " + (dir / "runs");
    // Off loopback without a token the head refuses to start.
    ASSERT_EQ(script(dir / "open.sh", hosts.on('a', serve, dir / "open-head") + "wait\n", 30), 0);
    EXPECT_NE(status_of(dir / "open-head"), 0);
    EXPECT_NE(fs::read_file(dir / "open-head").find("token"), std::string::npos)
        << fs::read_file(dir / "open-head");

    std::string lines = hosts.on('a', serve + " --token " + token, dir / "head");
    // The client waits for the head to answer, from its own host.
    lines += fmt::format(
        "for i in $(seq 100); do ip netns exec {}b {} status --address {} --token {} "
        ">/dev/null 2>&1 && break; sleep 0.1; done\n",
        hosts.tag, kiln, head, token);
    lines += hosts.on('b', kiln + " submit --address " + head + " -- " + kTrain, dir / "without");
    lines += "wait $!\n";
    lines += hosts.on(
        'b', kiln + " submit --follow --address " + head + " --token " + token + " -- " + kTrain,
        dir / "with");
    // The head stops once the client is done.
    lines += fmt::format("wait $!\nip netns pids {}a | xargs -r kill\nwait\n", hosts.tag);
    script(dir / "client.sh", lines, 170);
    EXPECT_NE(status_of(dir / "without"), 0) << fs::read_file(dir / "without");
    EXPECT_NE(fs::read_file(dir / "without").find("token"), std::string::npos)
        << fs::read_file(dir / "without");
    EXPECT_EQ(status_of(dir / "with"), 0)
        << fs::read_file(dir / "with") << fs::read_file(dir / "head");
    EXPECT_NE(fs::read_file(dir / "with").find("step      6/6"), std::string::npos)
        << fs::read_file(dir / "with");
}

}  // namespace
}  // namespace kiln
