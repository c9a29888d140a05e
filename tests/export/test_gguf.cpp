// GGUF export: our writer and reader against each other and against damaged files, the q8_0
// block rule, the Q/K row order against the rotary embedding, the export of a tensor-parallel
// checkpoint against the Hugging Face export, bad input, and the proof by the real consumer:
// llama.cpp (node-llama-cpp's prebuilt binary, installed by scripts/setup.sh) loads the files,
// tokenizes as kiln does, continues a prompt as `kiln sample` does, and q8_0 keeps perplexity.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "core/fs.h"
#include "core/safetensors.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "export/gguf.h"
#include "export/gguf_export.h"
#include "fixture.h"
#include "kernels/tensors.h"

namespace kiln::exporter {
namespace {

using kiln::testing::randn;

using kiln::testing::TempDir;

using kiln::testing::kiln;
using kiln::testing::Result;

TEST(GgufFormat, WriterAndReaderAgreeOnEveryTypeAndValue) {
    TempDir dir;
    const std::string path = dir / "t.gguf";
    GgufWriter w;
    w.set("general.architecture", GgufValue::string("llama"));
    w.set("t.u32", GgufValue::uint32(4000000000u));
    w.set("t.u64", GgufValue::uint64(uint64_t(1) << 40));
    w.set("t.f32", GgufValue::float32(0.25f));
    w.set("t.bool", GgufValue::boolean(true));
    w.set("t.strings", GgufValue::array(GgufType::string, {GgufValue::string("a\nb"),
                                                           GgufValue::string("\xe2\x96\x81x")}));
    const std::vector<float> x = randn(3 * 64, 1);
    const GgmlType types[] = {GgmlType::f32, GgmlType::f16, GgmlType::bf16, GgmlType::q8_0};
    for (GgmlType t : types)
        w.add_tensor(std::string("w.") + std::string(ggml_type_name(t)), {64, 3}, t);
    w.add_tensor("odd", {5}, GgmlType::f32);  // 20 bytes: the next tensor must be padded
    w.open(path);
    EXPECT_TRUE(fs::exists(path + ".tmp"));
    EXPECT_FALSE(fs::exists(path));
    for (GgmlType t : types) {
        std::vector<uint8_t> b(ggml_bytes(t, int64_t(x.size())));
        encode_values(t, x.data(), int64_t(x.size()), b.data());
        w.write_tensor(std::string("w.") + std::string(ggml_type_name(t)), b.data(), b.size());
    }
    std::vector<uint8_t> odd(20, 7);
    w.write_tensor("odd", odd.data(), odd.size());
    const uint64_t bytes = w.commit();
    EXPECT_FALSE(fs::exists(path + ".tmp"));
    EXPECT_EQ(bytes, std::filesystem::file_size(path));

    GgufFile f(path);
    EXPECT_EQ(f.version(), 3u);
    EXPECT_EQ(f.alignment(), 32u);
    EXPECT_EQ(f.data_offset() % 32, 0u);
    EXPECT_EQ(f.get_string("general.architecture"), "llama");
    EXPECT_EQ(f.get_uint("t.u32"), 4000000000u);
    EXPECT_EQ(f.get_uint("t.u64"), uint64_t(1) << 40);
    EXPECT_EQ(f.get_float("t.f32"), 0.25);
    EXPECT_EQ(f.find("t.bool")->u, 1u);
    const GgufValue& s = f.get_array("t.strings", GgufType::string);
    ASSERT_EQ(s.items.size(), 2u);
    EXPECT_EQ(s.items[0].s, "a\nb");
    EXPECT_EQ(s.items[1].s, "\xe2\x96\x81x");
    EXPECT_NE(kiln::testing::message_of([&] { f.get_string("t.u32"); }).find("t.u32"),
              std::string::npos);
    ASSERT_EQ(f.tensors().size(), 5u);
    for (const auto& t : f.tensors())
        EXPECT_EQ(t.offset % 32, 0u) << t.name;
    EXPECT_EQ(f.values("w.f32"), x);
    const std::vector<float> h = f.values("w.f16"), b = f.values("w.bf16"), q = f.values("w.q8_0");
    for (size_t i = 0; i < x.size(); i++) {
        EXPECT_NEAR(h[i], x[i], std::fabs(x[i]) * 1e-3 + 1e-7) << i;
        EXPECT_NEAR(b[i], x[i], std::fabs(x[i]) * 8e-3) << i;
    }
    for (size_t blk = 0; blk < x.size() / 32; blk++) {
        float amax = 0;
        for (size_t k = 0; k < 32; k++)
            amax = std::max(amax, std::fabs(x[blk * 32 + k]));
        for (size_t k = 0; k < 32; k++)  // half a step, and the fp16 scale's rounding
            EXPECT_NEAR(q[blk * 32 + k], x[blk * 32 + k], amax / 127 * 0.5 + amax * 1e-3);
    }
    EXPECT_EQ(f.tensor("odd")->bytes, 20u);
    EXPECT_EQ(f.data(*f.tensor("odd"))[19], 7);
}

// One q8_0 block by hand: the scale is max|x| / 127 in fp16, each value round(x / d).
TEST(GgufFormat, Q8_0IsThe32ValueBlockWithAnFp16Scale) {
    std::vector<float> x(32);
    for (int k = 0; k < 32; k++)
        x[k] = float(k - 16) * 0.1f;  // max |x| = 1.6
    std::vector<uint8_t> b(kQ8BlockBytes);
    encode_values(GgmlType::q8_0, x.data(), 32, b.data());
    uint16_t dh;
    std::memcpy(&dh, b.data(), 2);
    EXPECT_EQ(dh, f32_to_f16(1.6f / 127));
    for (int k = 0; k < 32; k++)
        EXPECT_EQ(int8_t(b[2 + k]), std::lround(x[k] / (1.6f / 127))) << k;
    EXPECT_EQ(int8_t(b[2]), -127);
    std::vector<float> zeros(32, 0.0f);
    encode_values(GgmlType::q8_0, zeros.data(), 32, b.data());
    for (uint8_t v : b)
        EXPECT_EQ(v, 0);
    EXPECT_EQ(f16_to_f32(f32_to_f16(65504.0f)), 65504.0f);
    EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
}

TEST(GgufFormat, ReaderRefusesDamagedFilesInOneSentence) {
    TempDir dir;
    const std::string good = dir / "good.gguf";
    {
        GgufWriter w;
        w.set("general.architecture", GgufValue::string("llama"));
        w.add_tensor("a", {32, 2}, GgmlType::f32);
        w.add_tensor("b", {32}, GgmlType::q8_0);
        w.open(good);
        std::vector<uint8_t> a(256, 1), b(34, 2);
        w.write_tensor("a", a.data(), a.size());
        w.write_tensor("b", b.data(), b.size());
        w.commit();
    }
    const std::string bytes = fs::read_file(good);
    auto damaged = [&](const std::string& name, std::string content) {
        const std::string path = dir / name;
        std::ofstream(path, std::ios::binary) << content;
        return kiln::testing::message_of([&] { GgufFile f(path); });
    };
    auto offset_of = [&](const std::string& name) {  // the tensor entry's fields after its name
        size_t at = bytes.find(std::string(1, char(name.size())) + std::string(7, '\0') + name);
        EXPECT_NE(at, std::string::npos) << name;
        return at + 8 + name.size();
    };
    std::string m = damaged("magic.gguf", "GGUX" + bytes.substr(4));
    EXPECT_NE(m.find("magic.gguf is not a GGUF file"), std::string::npos) << m;
    std::string v2 = bytes;
    v2[4] = 2;
    m = damaged("v2.gguf", v2);
    EXPECT_NE(m.find("version 2"), std::string::npos) << m;
    m = damaged("short.gguf", bytes.substr(0, bytes.size() - 40));
    EXPECT_NE(m.find("tensor b"), std::string::npos) << m;
    EXPECT_NE(m.find("past the end"), std::string::npos) << m;
    m = damaged("header.gguf", bytes.substr(0, 60));
    EXPECT_NE(m.find("header.gguf ends inside the header"), std::string::npos) << m;
    // A file cut short of the fixed 24-byte start still has its magic: it is truncated.
    m = damaged("ten.gguf", bytes.substr(0, 10));
    EXPECT_NE(m.find("ten.gguf ends inside the header (reading the tensor count at byte 8): "
                     "the file is truncated"),
              std::string::npos)
        << m;
    m = damaged("two.gguf", bytes.substr(0, 2));
    EXPECT_NE(m.find("two.gguf ends inside the header (reading the magic at byte 0)"),
              std::string::npos)
        << m;
    m = damaged("tiny.gguf", "GGX");
    EXPECT_NE(m.find("tiny.gguf is not a GGUF file"), std::string::npos) << m;
    std::string misaligned = bytes;
    misaligned[offset_of("b") + 4 + 8 + 4] += 4;  // n_dims, one dim, type, then the offset
    m = damaged("misaligned.gguf", misaligned);
    EXPECT_NE(m.find("not a multiple of the alignment 32"), std::string::npos) << m;
    std::string type = bytes;
    type[offset_of("a") + 4 + 16] = 12;  // q4_K, which kiln does not read
    m = damaged("type.gguf", type);
    EXPECT_NE(m.find("tensor a has ggml type 12"), std::string::npos) << m;
    std::string overlap = bytes;
    overlap[offset_of("b") + 4 + 8 + 4] = 0;
    overlap[offset_of("b") + 4 + 8 + 5] = 0;
    m = damaged("overlap.gguf", overlap);
    EXPECT_NE(m.find("overlap"), std::string::npos) << m;
    std::string count = bytes;
    count[16 + 6] = 0x7f;  // the metadata count, absurdly large
    m = damaged("count.gguf", count);
    EXPECT_NE(m.find("more than its"), std::string::npos) << m;
    // `kiln export --inspect` says the same, and exits non-zero.
    Result r = kiln("export --inspect " + (dir / "misaligned.gguf"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("not a multiple of the alignment"), std::string::npos) << r.out;
}

// Rotary embedding of one head's vector at position `pos`: kiln's (Hugging Face's) pairing
// turns dimension i with i + D/2; llama.cpp's turns 2j with 2j + 1. Both by theta^(-2j/D).
std::vector<double> rope(const std::vector<double>& x, int pos, bool adjacent) {
    const int D = int(x.size());
    std::vector<double> y(x);
    for (int j = 0; j < D / 2; j++) {
        const double a = pos * std::pow(10000.0, -2.0 * j / D);
        const int p = adjacent ? 2 * j : j, q = adjacent ? 2 * j + 1 : j + D / 2;
        y[p] = x[p] * std::cos(a) - x[q] * std::sin(a);
        y[q] = x[p] * std::sin(a) + x[q] * std::cos(a);
    }
    return y;
}

TEST(GgufExport, ReorderedQAndKGiveTheSameAttentionScores) {
    const int64_t H = 3, D = 8, C = 5;
    const std::vector<float> wq = randn(H * D * C, 2), wk = randn(H * D * C, 3);
    std::vector<float> pq(wq.size()), pk(wk.size()), back(wq.size());
    permute_rotary_rows(wq.data(), pq.data(), H, D, C);
    permute_rotary_rows(wk.data(), pk.data(), H, D, C);
    unpermute_rotary_rows(pq.data(), back.data(), H, D, C);
    EXPECT_EQ(back, wq);
    EXPECT_NE(pq, wq);
    const std::vector<float> x1 = randn(C, 4), x2 = randn(C, 5);
    auto head = [&](const std::vector<float>& w, const std::vector<float>& x, int64_t h) {
        std::vector<double> y(D, 0.0);
        for (int64_t d = 0; d < D; d++)
            for (int64_t c = 0; c < C; c++)
                y[d] += double(w[(h * D + d) * C + c]) * x[c];
        return y;
    };
    for (int64_t h = 0; h < H; h++) {
        const auto q_hf = rope(head(wq, x1, h), 7, false), k_hf = rope(head(wk, x2, h), 3, false);
        const auto q_gg = rope(head(pq, x1, h), 7, true), k_gg = rope(head(pk, x2, h), 3, true);
        double s_hf = 0, s_gg = 0;
        for (int64_t d = 0; d < D; d++)
            s_hf += q_hf[d] * k_hf[d], s_gg += q_gg[d] * k_gg[d];
        EXPECT_NEAR(s_gg, s_hf, 1e-9 * (1 + std::fabs(s_hf))) << "head " << h;
    }
}

// A micro model with two query heads per KV head.
const std::string kMicro =
    " --set model.dim=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2"
    " --set train.seq_len=32 --set data.seq_len=32 --set train.micro_batch=8"
    " --set train.warmup_steps=5 --set train.lr=1e-2 --set train.min_lr=1e-3"
    " --set train.log_every=5 --set train.peak_gflops=100";

// Data with a trained tokenizer, shared by the export tests below.
const TempDir& micro_data() {
    static const TempDir dir;
    static const int made = kiln::testing::run(
        kiln::testing::kiln_binary() + " data --corpus builtin:stories:1500 --train-tokenizer 320" +
        " --set data.seq_len=32 --out " + (dir / "data") + " >" + (dir / "log") + " 2>&1");
    EXPECT_EQ(made, 0) << fs::read_file(dir / "log");
    return dir;
}

TEST(GgufExport, ATensorParallelCheckpointMatchesTheHuggingFaceExport) {
    const TempDir& d = micro_data();
    TempDir dir;
    const std::string data = " --set data.source=" + (d / "data") +
                             " --set data.tokenizer=" + (d / "data/tokenizer.model") +
                             " --set model.vocab_size=320";
    Result t = kiln("launch -n 2 -- kiln train" + kMicro + data +
                    " --set parallel.tp=2 --set train.steps=10 --set run.dir=" + (dir / "run"));
    ASSERT_EQ(t.rc, 0) << t.out;
    ASSERT_EQ(
        kiln("export --checkpoint " + (dir / "run") + " --format hf --out " + (dir / "hf")).rc, 0);
    // The run's tokenizer goes with the HF folder too, unasked.
    EXPECT_EQ(fs::read_file(dir / "hf/tokenizer.model"), fs::read_file(d / "data/tokenizer.model"));
    Result e =
        kiln("export --checkpoint " + (dir / "run") + " --format gguf --out " + (dir / "m.gguf"));
    ASSERT_EQ(e.rc, 0) << e.out;
    GgufFile f(dir / "m.gguf");
    EXPECT_EQ(f.get_string("general.architecture"), "llama");
    EXPECT_EQ(f.get_uint("llama.block_count"), 2u);
    EXPECT_EQ(f.get_uint("llama.attention.head_count_kv"), 2u);
    EXPECT_EQ(f.get_uint("kiln.training.step"), 10u);
    EXPECT_EQ(f.get_string("kiln.data.fingerprint"),
              fmt::format("xxh64:{:016x}", fs::xxh64_file(d / "data/manifest.json")));
    data::Tokenizer tok(d / "data/tokenizer.model");
    const GgufValue& tokens = f.get_array("tokenizer.ggml.tokens", GgufType::string);
    const GgufValue& types = f.get_array("tokenizer.ggml.token_type", GgufType::i32);
    ASSERT_EQ(tokens.items.size(), 320u);
    EXPECT_EQ(tokens.items[1].s, "<s>");
    EXPECT_EQ(types.items[0].i, 2);  // <unk>
    EXPECT_EQ(types.items[2].i, 3);  // </s>, control
    EXPECT_EQ(tokens.items[3 + 10].s, "<0x0A>");
    EXPECT_EQ(types.items[3 + 10].i, 6);  // byte
    EXPECT_EQ(tokens.items[300].s, tok.piece(300));

    SafetensorsFile hf(dir / "hf/model.safetensors");
    auto same = [&](const std::string& gguf, const std::string& hf_name, int64_t rotary_heads) {
        const TensorInfo* info = hf.find(hf_name);
        ASSERT_NE(info, nullptr) << hf_name;
        const float* want = static_cast<const float*>(hf.data(hf_name, DType::f32, info->shape));
        std::vector<float> got = f.values(gguf), ordered(got.size());
        ASSERT_EQ(int64_t(got.size()), info->numel()) << gguf;
        const GgufTensor* t = f.tensor(gguf);
        EXPECT_EQ(t->dims.front(), info->shape.back()) << gguf;  // ggml lists dims innermost first
        if (rotary_heads > 0) {
            unpermute_rotary_rows(got.data(), ordered.data(), rotary_heads, 16, info->shape[1]);
            got = ordered;
        }
        EXPECT_TRUE(std::equal(got.begin(), got.end(), want)) << gguf;
    };
    same("token_embd.weight", "model.embed_tokens.weight", 0);
    same("output.weight", "lm_head.weight", 0);
    same("output_norm.weight", "model.norm.weight", 0);
    for (int l = 0; l < 2; l++) {
        const std::string b = "blk." + std::to_string(l) + ".";
        const std::string m = "model.layers." + std::to_string(l) + ".";
        same(b + "attn_q.weight", m + "self_attn.q_proj.weight", 4);
        same(b + "attn_k.weight", m + "self_attn.k_proj.weight", 2);
        same(b + "attn_v.weight", m + "self_attn.v_proj.weight", 0);
        same(b + "attn_output.weight", m + "self_attn.o_proj.weight", 0);  // split by columns
        same(b + "ffn_gate.weight", m + "mlp.gate_proj.weight", 0);
        same(b + "ffn_up.weight", m + "mlp.up_proj.weight", 0);
        same(b + "ffn_down.weight", m + "mlp.down_proj.weight", 0);
        same(b + "attn_norm.weight", m + "input_layernorm.weight", 0);
        same(b + "ffn_norm.weight", m + "post_attention_layernorm.weight", 0);
    }

    // Every dtype: the matrices in it, norms in f32, the values close; --inspect reads them.
    for (const char* dtype : {"f16", "bf16", "q8_0"}) {
        const std::string out = dir / (std::string(dtype) + ".gguf");
        Result r = kiln("export --checkpoint " + (dir / "run") + " --format gguf --dtype " + dtype +
                        " --out " + out);
        ASSERT_EQ(r.rc, 0) << r.out;
        GgufFile g(out);
        EXPECT_EQ(ggml_type_name(g.tensor("blk.1.ffn_down.weight")->type), dtype);
        EXPECT_EQ(g.tensor("blk.1.ffn_norm.weight")->type, GgmlType::f32);
        const std::vector<float> a = f.values("blk.0.attn_q.weight"),
                                 b = g.values("blk.0.attn_q.weight");
        double err = 0, norm = 0;
        for (size_t i = 0; i < a.size(); i++)
            err += (a[i] - b[i]) * (a[i] - b[i]), norm += a[i] * a[i];
        EXPECT_LT(std::sqrt(err / norm), 1e-2) << dtype;
        Result inspect = kiln("export --inspect " + out);
        EXPECT_EQ(inspect.rc, 0) << inspect.out;
        EXPECT_NE(inspect.out.find("blk.1.ffn_down.weight"), std::string::npos) << inspect.out;
        EXPECT_NE(inspect.out.find("tokenizer.ggml.model = \"llama\""), std::string::npos);
    }
    EXPECT_LT(std::filesystem::file_size(dir / "q8_0.gguf"),
              std::filesystem::file_size(dir / "f16.gguf"));
}

// kMicro trained 2 steps on synthetic data into `run` (which names no tokenizer); the exit code.
int train_two_steps(const std::string& run, int vocab) {
    return kiln("train" + kMicro + " --set model.vocab_size=" + std::to_string(vocab) +
                " --set train.steps=2 --set run.dir=" + run)
        .rc;
}

TEST(GgufExport, BadInputIsOneSentenceAndWritesNothing) {
    const TempDir& d = micro_data();
    TempDir dir;
    // A run on synthetic data names no tokenizer.
    ASSERT_EQ(train_two_steps(dir / "synthetic", 320), 0);
    Result r = kiln("export --checkpoint " + (dir / "synthetic") + " --format gguf --out " +
                    (dir / "a.gguf"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("names no tokenizer"), std::string::npos) << r.out;
    EXPECT_FALSE(fs::exists(dir / "a.gguf"));
    EXPECT_FALSE(fs::exists(dir / "a.gguf.tmp"));
    const std::string base = "export --checkpoint " + (dir / "synthetic") +
                             " --format gguf --tokenizer " + (d / "data/tokenizer.model");
    r = kiln(base + " --dtype q4_0 --out " + (dir / "a.gguf"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("--dtype q4_0 is not one of f32, f16, bf16, q8_0"), std::string::npos)
        << r.out;
    EXPECT_FALSE(fs::exists(dir / "a.gguf"));
    // An existing file stays as it was without --force, and is replaced with it.
    fs::write_file_atomic(dir / "a.gguf", std::string("keep me"));
    r = kiln(base + " --out " + (dir / "a.gguf"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("a.gguf exists; pass --force to replace it"), std::string::npos) << r.out;
    EXPECT_EQ(fs::read_file(dir / "a.gguf"), "keep me");
    r = kiln(base + " --force --out " + (dir / "a.gguf"));
    EXPECT_EQ(r.rc, 0) << r.out;
    EXPECT_EQ(GgufFile(dir / "a.gguf").get_uint("kiln.training.step"), 2u);
    EXPECT_EQ(GgufFile(dir / "a.gguf").get_string("kiln.data.fingerprint"), "synthetic");
    // A tokenizer of another size than the model's vocabulary.
    ASSERT_EQ(train_two_steps(dir / "v256", 256), 0);
    r = kiln("export --checkpoint " + (dir / "v256") + " --format gguf --tokenizer " +
             (d / "data/tokenizer.model") + " --out " + (dir / "b.gguf"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("has 320 pieces but the checkpoint's model has 256"), std::string::npos)
        << r.out;
    EXPECT_FALSE(fs::exists(dir / "b.gguf"));
    EXPECT_FALSE(fs::exists(dir / "b.gguf.tmp"));
}

// An export replaces nothing already there without --force, and with it only regular files:
// the rename that replaces a file would put a file in place of a FIFO, a device node or a link.
TEST(GgufExport, ExistingOutputsNeedForceAndMustBeRegularFiles) {
    const TempDir& d = micro_data();
    TempDir dir;
    ASSERT_EQ(train_two_steps(dir / "run", 320), 0);
    auto is_fifo = [](const std::string& path) {
        struct stat st;
        return ::lstat(path.c_str(), &st) == 0 && S_ISFIFO(st.st_mode);
    };
    // Hugging Face: a second export into the same folder asks for --force, and keeps the file.
    const std::string hf = "export --checkpoint " + (dir / "run") + " --format hf --out ";
    Result r = kiln(hf + (dir / "hf"));
    ASSERT_EQ(r.rc, 0) << r.out;
    const std::string exported = fs::read_file(dir / "hf/model.safetensors");
    fs::write_file_atomic(dir / "hf/model.safetensors", std::string("keep me"));
    r = kiln(hf + (dir / "hf"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find(dir / "hf/model.safetensors exists; pass --force to replace it"),
              std::string::npos)
        << r.out;
    EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
    EXPECT_EQ(fs::read_file(dir / "hf/model.safetensors"), "keep me");
    r = kiln(hf + (dir / "hf") + " --force");
    EXPECT_EQ(r.rc, 0) << r.out;
    EXPECT_EQ(fs::read_file(dir / "hf/model.safetensors"), exported);
    // A FIFO in a file's place, or as the folder, is refused even with --force, and stays.
    fs::make_dirs(dir / "hf2");
    ASSERT_EQ(::mkfifo((dir / "hf2/model.safetensors").c_str(), 0644), 0);
    r = kiln(hf + (dir / "hf2") + " --force");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find(dir / "hf2/model.safetensors is a FIFO, not a regular file"),
              std::string::npos)
        << r.out;
    EXPECT_TRUE(is_fifo(dir / "hf2/model.safetensors"));
    EXPECT_FALSE(fs::exists(dir / "hf2/config.json"));
    ASSERT_EQ(::mkfifo((dir / "pipe").c_str(), 0644), 0);
    r = kiln(hf + (dir / "pipe") + " --force");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find(dir / "pipe is a FIFO, not a folder"), std::string::npos) << r.out;
    EXPECT_TRUE(is_fifo(dir / "pipe"));
    // GGUF: the same for a FIFO, and a symbolic link is left a link (its target untouched).
    const std::string gguf = "export --checkpoint " + (dir / "run") +
                             " --format gguf --force --tokenizer " + (d / "data/tokenizer.model") +
                             " --out ";
    r = kiln(gguf + (dir / "pipe"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find(dir / "pipe is a FIFO, not a regular file"), std::string::npos) << r.out;
    EXPECT_TRUE(is_fifo(dir / "pipe"));
    EXPECT_FALSE(fs::exists(dir / "pipe.tmp"));
    fs::write_file_atomic(dir / "target.gguf", std::string("keep me"));
    std::filesystem::create_symlink(dir / "target.gguf", dir / "link.gguf");
    r = kiln(gguf + (dir / "link.gguf"));
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find(dir / "link.gguf is a symbolic link, not a regular file"),
              std::string::npos)
        << r.out;
    EXPECT_TRUE(std::filesystem::is_symlink(dir / "link.gguf"));
    EXPECT_EQ(fs::read_file(dir / "target.gguf"), "keep me");
}

// node-llama-cpp as scripts/setup.sh installs it, or why it cannot run here.
std::string llama_cpp_missing() {
    const std::string dir = kiln::testing::source_dir() + "/tests/export/llama_cpp";
    if (!fs::exists(dir + "/node_modules/node-llama-cpp/package.json") ||
        !fs::exists(dir + "/node_modules/@node-llama-cpp/linux-x64/package.json"))
        return "node-llama-cpp is not installed in " + dir + " (bash scripts/setup.sh installs it)";
    if (kiln::testing::run("node --version >/dev/null 2>&1") != 0)
        return "node is not on PATH (bash scripts/setup.sh installs it)";
    return "";
}

std::vector<int> ints(const nlohmann::json& j) {
    return j.get<std::vector<int>>();
}

// The proof by the consumer: a model trained on text, exported, run by llama.cpp.
TEST(LlamaCpp, LoadsTokenizesAndContinuesAsKilnDoes) {
    if (std::string why = llama_cpp_missing(); !why.empty())
        GTEST_SKIP() << why;
    TempDir dir;
    const std::string tok_path = dir / "data/tokenizer.model";
    ASSERT_EQ(kiln("data --corpus builtin:stories:3000 --train-tokenizer 512 --set data.seq_len=64"
                   " --out " +
                   (dir / "data"))
                  .rc,
              0);
    // Held-out text: other stories (another seed), the same tokenizer.
    Result h = kiln("data --corpus builtin:stories:4 --set data.seed=7 --set data.seq_len=64" +
                    std::string(" --tokenizer ") + tok_path + " --out " + (dir / "heldout"));
    ASSERT_EQ(h.rc, 0) << h.out;
    Result t = kiln(
        "train --set model.dim=128 --set model.n_layers=2 --set model.n_heads=4"
        " --set model.n_kv_heads=2 --set model.vocab_size=512 --set train.seq_len=64"
        " --set data.seq_len=64 --set train.micro_batch=8 --set train.steps=100"
        " --set train.warmup_steps=10 --set train.lr=3e-3 --set train.min_lr=3e-4"
        " --set train.log_every=50 --set data.source=" +
        (dir / "data") + " --set data.tokenizer=" + tok_path + " --set run.dir=" + (dir / "run"));
    ASSERT_EQ(t.rc, 0) << t.out;
    for (const char* dtype : {"f32", "f16", "bf16", "q8_0"}) {
        Result e = kiln("export --checkpoint " + (dir / "run") + " --format gguf --dtype " + dtype +
                        " --out " + (dir / (std::string(dtype) + ".gguf")));
        ASSERT_EQ(e.rc, 0) << e.out;
    }

    data::Tokenizer tok(tok_path);
    const std::vector<std::string> texts = {
        "Once upon a time, there were 3 cats and 12 dogs.",
        "Tom said: \"Let's go!\" (really?) -- yes; 100% sure...",
        "Zoë ate crème brûlée in Zürich \xe2\x80\x94 \xe2\x98\x83 \xe6\x97\xa5\xe6\x9c\xac",
        "one line\nnext line\n\n  indented\tand tabbed",
    };
    const std::string prompt_text = "Once upon a time, there was a little";
    std::vector<int> prompt = {tok.bos_id()};
    for (int id : tok.encode(prompt_text))
        prompt.push_back(id);
    // Every held-out row, for perplexity.
    data::ShardSet held(dir / "heldout", 512);
    ASSERT_GE(held.rows(), 4);
    ASSERT_LE(held.rows(), 24);
    nlohmann::json rows = nlohmann::json::array();
    for (int64_t r = 0; r < held.rows(); r++) {
        std::vector<int32_t> row(held.seq_len());
        held.read_row(r, row.data());
        rows.push_back(row);
    }

    nlohmann::json request;
    request["models"] = {
        {{"path", dir / "f32.gguf"},
         {"texts", texts},
         {"prompt", prompt},
         {"n", 32},
         {"perplexity", rows}},
        {{"path", dir / "f16.gguf"}, {"prompt", prompt}, {"n", 32}},
        {{"path", dir / "bf16.gguf"}, {"prompt", prompt}, {"n", 32}},
        {{"path", dir / "q8_0.gguf"}, {"prompt", prompt}, {"n", 32}, {"perplexity", rows}},
    };
    fs::write_file_atomic(dir / "request.json", request.dump());
    Result n = {
        kiln::testing::run("cd " + kiln::testing::source_dir() +
                           "/tests/export/llama_cpp && node check.mjs " + (dir / "request.json") +
                           " >" + (dir / "answer.json") + " 2>" + (dir / "node.log")),
        fs::read_file(dir / "node.log")};
    ASSERT_EQ(n.rc, 0) << n.out;
    const auto answer = nlohmann::json::parse(fs::read_file(dir / "answer.json"))["models"];
    ASSERT_EQ(answer.size(), 4u);

    // llama.cpp's tokenizer, from the file's vocabulary, gives kiln's SentencePiece ids.
    for (size_t k = 0; k < texts.size(); k++)
        EXPECT_EQ(ints(answer[0]["tokens"][k]), tok.encode(texts[k])) << texts[k];

    // Greedy continuation: llama.cpp on the f32 file equals `kiln sample` at temperature 0
    // (fp32 products), token for token.
    Result s = kiln("sample --checkpoint " + (dir / "run") + " --prompt '" + prompt_text +
                    "' --temperature 0 --tokens 32 --ids --precision fp32");
    ASSERT_EQ(s.rc, 0) << s.out;
    std::vector<int> kiln_ids;
    std::istringstream line(s.out);
    for (int id; line >> id;)
        kiln_ids.push_back(id);
    const std::vector<int> f32 = ints(answer[0]["greedy"]);
    EXPECT_EQ(f32, kiln_ids) << "llama.cpp: " << tok.decode(f32) << "\nkiln: " << s.out;
    EXPECT_EQ(f32.size(), 32u);
    // The model learned something: its continuation is not one token over and over.
    EXPECT_GT(std::set<int>(f32.begin(), f32.end()).size(), 4u) << tok.decode(f32);
    // f16 and bf16 agree with f32 for at least the first 16 tokens.
    for (int m : {1, 2}) {
        const std::vector<int> g = ints(answer[m]["greedy"]);
        ASSERT_GE(g.size(), 16u);
        EXPECT_TRUE(std::equal(g.begin(), g.begin() + 16, f32.begin())) << answer[m] << "\n"
                                                                        << tok.decode(g);
    }
    // q8_0 makes text, and llama.cpp's perplexity of it on the held-out rows is within 2% of
    // the f32 file's, which in turn is kiln's own (`kiln eval`, fp32) on those rows.
    const std::vector<int> q = ints(answer[3]["greedy"]);
    EXPECT_GE(q.size(), 16u);
    EXPECT_FALSE(tok.decode(q).empty());
    const double ppl_f32 =
        std::exp(answer[0]["nll"].get<double>() / answer[0]["count"].get<double>());
    const double ppl_q8 =
        std::exp(answer[3]["nll"].get<double>() / answer[3]["count"].get<double>());
    EXPECT_NEAR(ppl_q8 / ppl_f32, 1.0, 0.02) << "f32 " << ppl_f32 << ", q8_0 " << ppl_q8;
    EXPECT_LT(ppl_f32, 100.0);  // uniform over 512 tokens would be 512
    Result ev = kiln("eval --checkpoint " + (dir / "run") + " --data " + (dir / "heldout") +
                     " --precision fp32");
    ASSERT_EQ(ev.rc, 0) << ev.out;
    const auto ej = nlohmann::json::parse(ev.out.substr(ev.out.rfind('{')));
    EXPECT_NEAR(std::log(ppl_f32), ej["loss"].get<double>(), 1e-3 * ej["loss"].get<double>())
        << ev.out;
    std::printf("llama.cpp perplexity on %lld held-out rows: f32 %.4f, q8_0 %.4f; kiln eval %.4f\n",
                static_cast<long long>(held.rows()), ppl_f32, ppl_q8,
                std::exp(ej["loss"].get<double>()));
}

}  // namespace
}  // namespace kiln::exporter
