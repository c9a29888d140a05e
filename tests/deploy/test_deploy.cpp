// The deployment files, checked against the binary they deploy: the Kubernetes manifests parse
// and hold the recipe's topology (a Volcano queue, gang-scheduled jobs that restart on pod
// failure, the shared volume, the dashboard on 8265, one config); every kiln command in them is
// accepted by kiln itself (config checked with --check, the dashboard started for real); and the
// environment Volcano gives the training pods brings real kiln ranks together on loopback.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <map>
#include <thread>

#include "core/fs.h"
#include "fixture.h"
#include "launch/supervisor.h"

namespace kiln {
namespace {

using kiln::testing::TempDir;

std::vector<YAML::Node> manifests() {
    std::vector<YAML::Node> docs;
    std::vector<std::filesystem::path> files;
    for (const auto& e :
         std::filesystem::directory_iterator(kiln::testing::source_dir() + "/deploy/k8s"))
        files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
        if (f.extension() != ".yaml")
            continue;
        for (const YAML::Node& d : YAML::LoadAllFromFile(f.string())) {
            if (d && d.IsMap())
                docs.push_back(d);
        }
    }
    return docs;
}

std::vector<YAML::Node> of_kind(const std::vector<YAML::Node>& docs, const std::string& kind) {
    std::vector<YAML::Node> out;
    for (const auto& d : docs) {
        if (d["kind"].as<std::string>() == kind)
            out.push_back(d);
    }
    return out;
}

// The ConfigMap's kiln.yaml, written to DIR/kiln.yaml; returns the path.
std::string write_config(const std::vector<YAML::Node>& docs, const TempDir& dir) {
    const std::string path = dir / "kiln.yaml";
    fs::write_file_atomic(path,
                          of_kind(docs, "ConfigMap")[0]["data"]["kiln.yaml"].as<std::string>());
    return path;
}

std::string shell_quote(const std::string& s) {
    std::string q = "'";
    for (char c : s)
        q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

// A container's command with the config's in-cluster path swapped for `config`.
std::vector<std::string> command_of(const YAML::Node& container, const std::string& config) {
    std::vector<std::string> argv;
    for (const auto& a : container["command"]) {
        std::string s = a.as<std::string>();
        argv.push_back(s == "/etc/kiln/kiln.yaml" ? config : s);
    }
    return argv;
}

TEST(Deploy, KubernetesManifestsHoldTheRecipesTopology) {
    auto docs = manifests();
    auto queues = of_kind(docs, "Queue"), jobs = of_kind(docs, "Job"),
         pvcs = of_kind(docs, "PersistentVolumeClaim"), maps = of_kind(docs, "ConfigMap"),
         deployments = of_kind(docs, "Deployment"), services = of_kind(docs, "Service");
    ASSERT_EQ(queues.size(), 1u);
    ASSERT_EQ(pvcs.size(), 1u);
    ASSERT_EQ(maps.size(), 1u);
    ASSERT_EQ(jobs.size(), 3u);
    ASSERT_EQ(deployments.size(), 1u);
    ASSERT_EQ(services.size(), 1u);
    const std::string queue = queues[0]["metadata"]["name"].as<std::string>();
    const std::string pvc = pvcs[0]["metadata"]["name"].as<std::string>();
    const std::string config_map = maps[0]["metadata"]["name"].as<std::string>();
    EXPECT_TRUE(queues[0]["spec"]["capability"]["cpu"]);
    EXPECT_EQ(pvcs[0]["spec"]["accessModes"][0].as<std::string>(), "ReadWriteMany");

    std::set<std::string> commands;
    for (const auto& job : jobs) {
        std::string name = job["metadata"]["name"].as<std::string>();
        EXPECT_EQ(job["apiVersion"].as<std::string>(), "batch.volcano.sh/v1alpha1") << name;
        const YAML::Node spec = job["spec"];
        EXPECT_EQ(spec["schedulerName"].as<std::string>(), "volcano") << name;
        EXPECT_EQ(spec["queue"].as<std::string>(), queue) << name;
        int replicas = 0;
        for (const auto& task : spec["tasks"])
            replicas += task["replicas"].as<int>();
        EXPECT_EQ(spec["minAvailable"].as<int>(), replicas) << name << ": gang = every rank";
        bool restarts = false;
        for (const auto& p : spec["policies"])
            restarts |= p["event"].as<std::string>() == "PodFailed" &&
                        p["action"].as<std::string>() == "RestartJob";
        EXPECT_TRUE(restarts) << name << ": no RestartJob on PodFailed";
        const YAML::Node pod = spec["tasks"][0]["template"]["spec"];
        bool shared = false, config = false;
        for (const auto& v : pod["volumes"]) {
            shared |= v["persistentVolumeClaim"] &&
                      v["persistentVolumeClaim"]["claimName"].as<std::string>() == pvc;
            config |= v["configMap"] && v["configMap"]["name"].as<std::string>() == config_map;
        }
        EXPECT_TRUE(shared && config) << name;
        commands.insert(pod["containers"][0]["command"][1].as<std::string>());
    }
    EXPECT_EQ(commands, (std::set<std::string>{"data", "compile", "train"}));
    // compile plans the training job's layout: its --ranks is the training job's replicas.
    std::map<std::string, YAML::Node> by_name;
    for (const auto& job : jobs)
        by_name[job["metadata"]["name"].as<std::string>()] = job;
    const YAML::Node compile_cmd =
        by_name["kiln-compile"]["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["command"];
    std::string ranks;
    for (size_t i = 0; i + 1 < compile_cmd.size(); i++) {
        if (compile_cmd[i].as<std::string>() == "--ranks")
            ranks = compile_cmd[i + 1].as<std::string>();
    }
    EXPECT_EQ(ranks, by_name["kiln-train"]["spec"]["tasks"][0]["replicas"].as<std::string>());
    // The training job's ranks find each other through Volcano's plugins.
    for (const auto& job : jobs) {
        if (job["metadata"]["name"].as<std::string>() == "kiln-train") {
            EXPECT_TRUE(job["spec"]["plugins"]["env"]);
            EXPECT_TRUE(job["spec"]["plugins"]["svc"]);
        }
    }
    const YAML::Node dash = deployments[0]["spec"]["template"]["spec"]["containers"][0];
    EXPECT_EQ(dash["command"][1].as<std::string>(), "serve");
    EXPECT_EQ(services[0]["spec"]["ports"][0]["port"].as<int>(), 8265);
}

TEST(Deploy, EveryKilnCommandInTheManifestsIsAccepted) {
    auto docs = manifests();
    TempDir dir;
    const std::string config = write_config(docs, dir);
    int checked = 0;
    for (const auto& job : of_kind(docs, "Job")) {
        auto argv =
            command_of(job["spec"]["tasks"][0]["template"]["spec"]["containers"][0], config);
        ASSERT_EQ(argv[0], "kiln");
        std::string cmd = kiln::testing::kiln_binary();
        for (size_t i = 1; i < argv.size(); i++)
            cmd += " " + shell_quote(argv[i]);
        std::string out = dir / "out.txt";
        EXPECT_EQ(kiln::testing::run(cmd + " --check >" + out + " 2>&1"), 0) << cmd << ":\n"
                                                                             << fs::read_file(out);
        EXPECT_NE(fs::read_file(out).find("preset: llama2-7b"), std::string::npos);
        checked++;
    }
    EXPECT_EQ(checked, 3);

    // The dashboard's command, for real: it serves (on a free port, with the token it is given).
    auto deployment = of_kind(docs, "Deployment")[0];
    auto argv = command_of(deployment["spec"]["template"]["spec"]["containers"][0], config);
    for (size_t i = 0; i + 1 < argv.size(); i++) {
        if (argv[i] == "--runs")
            argv[i + 1] = dir / "runs";
        if (argv[i] == "--port")
            argv[i + 1] = std::to_string(launch::free_port());
    }
    std::string cmd = "KILN_TOKEN=t0ken-t0ken-t0ken exec " + kiln::testing::kiln_binary();
    for (size_t i = 1; i < argv.size(); i++)
        cmd += " " + shell_quote(argv[i]);
    pid_t pid = ::fork();
    if (pid == 0) {
        ::execl("/bin/sh", "sh", "-c", (cmd + " >" + (dir / "serve.log") + " 2>&1").c_str(),
                nullptr);
        ::_exit(127);
    }
    bool up = false;
    for (int i = 0; i < 100 && !up; i++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        up =
            fs::read_file(dir / "serve.log").find("dashboard and jobs API on") != std::string::npos;
    }
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_TRUE(up) << fs::read_file(dir / "serve.log");
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// Two real ranks with the environment Volcano's env and svc plugins give two pods of the
// training job (pod names replaced by loopback), running the manifest's own command.
TEST(Deploy, VolcanoEnvironmentBringsTheRanksTogether) {
    auto docs = manifests();
    TempDir dir;
    const std::string config = write_config(docs, dir);
    YAML::Node train;
    for (const auto& job : of_kind(docs, "Job")) {
        if (job["metadata"]["name"].as<std::string>() == "kiln-train")
            train = job;
    }
    ASSERT_TRUE(train);
    const YAML::Node container = train["spec"]["tasks"][0]["template"]["spec"]["containers"][0];
    const std::string task = train["spec"]["tasks"][0]["name"].as<std::string>();
    std::string upper;
    for (char c : task)
        upper += c == '-' ? '_' : char(std::toupper(static_cast<unsigned char>(c)));
    std::string cmd = kiln::testing::kiln_binary();
    auto argv = command_of(container, config);
    for (size_t i = 1; i < argv.size(); i++)
        cmd += " " + shell_quote(argv[i]);
    // The recipe's 7B on 16 pods becomes a micro model on 2 here; everything else is the
    // manifest's: its command, its config file, its rendezvous port variable.
    cmd +=
        " --set model.preset=tiny --set model.dim=64 --set model.n_layers=2 --set model.n_heads=4"
        " --set model.n_kv_heads=2 --set model.vocab_size=256 --set train.seq_len=32"
        " --set train.grad_accum=1 --set train.steps=3 --set parallel.tp=1"
        " --set data.source=synthetic --set data.tokenizer= --set train.memory_limit_gb=0"
        " --set run.dir=" +
        (dir / "run");
    int port = launch::free_port();
    std::vector<pid_t> pids;
    for (int rank = 0; rank < 2; rank++) {
        std::string env =
            "env -u WORLD_SIZE -u RANK -u MASTER_ADDR VC_TASK_INDEX=" + std::to_string(rank) +
            " VK_TASK_INDEX=" + std::to_string(rank) + " VC_" + upper +
            "_HOSTS=localhost,localhost VC_" + upper +
            "_NUM=2 MASTER_PORT=" + std::to_string(port) + " ";
        pid_t pid = ::fork();
        if (pid == 0) {
            std::string line =
                env + cmd + " >" + (dir / ("rank" + std::to_string(rank) + ".log")) + " 2>&1";
            ::execl("/bin/sh", "sh", "-c", line.c_str(), nullptr);
            ::_exit(127);
        }
        pids.push_back(pid);
    }
    for (pid_t pid : pids) {
        int status = 0;
        ::waitpid(pid, &status, 0);
        EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
            << fs::read_file(dir / "rank0.log") << fs::read_file(dir / "rank1.log");
    }
    std::string log0 = fs::read_file(dir / "rank0.log");
    EXPECT_NE(log0.find("rank 0 of 2 connected (volcano)"), std::string::npos) << log0;
    EXPECT_TRUE(fs::exists(dir / "run/checkpoints/step-00000003/manifest.json"));
}

TEST(Deploy, SlurmScriptParsesAndNamesRealCommands) {
    std::string script = kiln::testing::source_dir() + "/deploy/slurm/kiln.sbatch";
    EXPECT_EQ(kiln::testing::run("bash -n " + script), 0);
    std::string text = fs::read_file(script);
    for (const char* cmd : {"\"$KILN\" data", "\"$KILN\" compile", "\"$KILN\" train"})
        EXPECT_NE(text.find(cmd), std::string::npos) << cmd;
    // The Dockerfile builds the binary with the project's own setup step.
    std::string docker = fs::read_file(kiln::testing::source_dir() + "/deploy/docker/Dockerfile");
    EXPECT_NE(docker.find("scripts/setup.sh --build-only"), std::string::npos);
    EXPECT_NE(docker.find("FROM debian:12"), std::string::npos);
}

}  // namespace
}  // namespace kiln
