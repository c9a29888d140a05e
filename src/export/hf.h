#pragma once
// Export a checkpoint as a Hugging Face folder that transformers' LlamaForCausalLM loads as is:
// model.safetensors (HF tensor names, fp32 or bf16) and config.json. Parameter names, shapes and
// the rotary convention already match HF (docs/formats.md), so this is a copy by the layout.
#include <string>

namespace kiln::exporter {

// dtype: "float32" or "bfloat16". Writes into out_dir (created); existing files there are
// replaced atomically. A tokenizer.model, when given, is copied with the LlamaTokenizer config.
void export_hf(const std::string& checkpoint_dir, const std::string& out_dir,
               const std::string& dtype, const std::string& tokenizer = "");

}  // namespace kiln::exporter
