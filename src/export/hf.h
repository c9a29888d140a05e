#pragma once
// Export a checkpoint as a Hugging Face folder that transformers' LlamaForCausalLM loads as is:
// model.safetensors (HF tensor names, fp32 or bf16) and config.json. Parameter names, shapes and
// the rotary convention already match HF (docs/formats.md), so this is a copy by the layout.
#include <string>

namespace kiln::exporter {

// dtype: "float32" or "bfloat16". Writes into out_dir (created). A tokenizer.model, when given,
// is copied with the LlamaTokenizer config. An output file already there is replaced
// (atomically) only with `force`, and only when it is a regular file: else Error names it
// before anything is written.
void export_hf(const std::string& checkpoint_dir, const std::string& out_dir,
               const std::string& dtype, const std::string& tokenizer = "", bool force = false);

}  // namespace kiln::exporter
