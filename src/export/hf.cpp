#include "export/hf.h"

#include <nlohmann/json.hpp>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/layout.h"

namespace kiln::exporter {

void export_hf(const std::string& checkpoint_dir, const std::string& out_dir,
               const std::string& dtype, const std::string& tokenizer, bool force) {
    if (dtype != "float32" && dtype != "bfloat16") {
        throw error("--dtype {} is not float32 or bfloat16", dtype);
    }
    // Every file this export writes is checked before any is: a refusal leaves the folder as
    // it was, not half replaced.
    fs::check_folder(out_dir);
    std::vector<std::string> outputs = {"model.safetensors", "config.json"};
    if (!tokenizer.empty())
        outputs.insert(outputs.end(),
                       {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"});
    for (const auto& name : outputs)
        fs::check_replaceable(out_dir + "/" + name, force);
    checkpoint::Checkpoint ck(checkpoint_dir);
    const model::LlamaConfig& c = ck.config();
    model::Layout layout(c);
    std::vector<float> params(layout.total());
    ck.load(layout, params.data(), nullptr, nullptr, 0, 0);

    fs::make_dirs(out_dir);
    SafetensorsWriter w;
    w.set_metadata("format", "pt");  // transformers refuses safetensors files without it
    std::vector<uint16_t> bf16;
    if (dtype == "bfloat16") {
        bf16.resize(params.size());
        convert_f32_to_bf16(bf16.data(), params.data(), int64_t(params.size()));
    }
    for (const auto& p : layout.params()) {
        if (dtype == "bfloat16") {
            w.add(p.hf_name, DType::bf16, p.shape, bf16.data() + p.offset);
        } else {
            w.add(p.hf_name, DType::f32, p.shape, params.data() + p.offset);
        }
    }
    w.write(out_dir + "/model.safetensors");

    nlohmann::ordered_json j;
    j["architectures"] = {"LlamaForCausalLM"};
    j["model_type"] = "llama";
    j["hidden_size"] = c.dim;
    j["intermediate_size"] = c.ffn_dim();
    j["num_hidden_layers"] = c.n_layers;
    j["num_attention_heads"] = c.n_heads;
    j["num_key_value_heads"] = c.n_kv_heads;
    j["vocab_size"] = c.vocab_size;
    j["max_position_embeddings"] = c.max_seq_len;
    j["rms_norm_eps"] = c.norm_eps;
    j["rope_theta"] = c.rope_theta;
    j["rope_scaling"] = nullptr;
    j["hidden_act"] = "silu";
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
    j["tie_word_embeddings"] = false;
    j["initializer_range"] = 0.02;
    j["pretraining_tp"] = 1;
    j["bos_token_id"] = 1;
    j["eos_token_id"] = 2;
    j["use_cache"] = true;
    j["torch_dtype"] = dtype;
    j["kiln_checkpoint_step"] = ck.state().step;
    fs::write_file_atomic(out_dir + "/config.json", j.dump(2) + "\n");

    if (!tokenizer.empty()) {
        fs::write_file_atomic(out_dir + "/tokenizer.model", fs::read_file(tokenizer));
        nlohmann::ordered_json t;
        t["tokenizer_class"] = "LlamaTokenizer";
        t["bos_token"] = "<s>";
        t["eos_token"] = "</s>";
        t["unk_token"] = "<unk>";
        t["add_bos_token"] = true;
        t["add_eos_token"] = false;
        t["model_max_length"] = c.max_seq_len;
        fs::write_file_atomic(out_dir + "/tokenizer_config.json", t.dump(2) + "\n");
        nlohmann::ordered_json sp;
        sp["bos_token"] = "<s>";
        sp["eos_token"] = "</s>";
        sp["unk_token"] = "<unk>";
        fs::write_file_atomic(out_dir + "/special_tokens_map.json", sp.dump(2) + "\n");
    }
}

}  // namespace kiln::exporter
