#include "train/evaluate.h"

#include <algorithm>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "data/shard.h"
#include "kernels/backends.h"
#include "model/llama.h"

namespace kiln::train {

EvalResult evaluate(const std::string& checkpoint_dir, const std::string& data_dir,
                    int64_t max_rows, const std::string& precision, int64_t batch,
                    const std::string& backend) {
    const kernels::Precision prec =
        kernels::resolve_precision(backend, precision, "--precision").precision;
    const kernels::Kernels& k = kernels::select_kernels(backend, prec, "--backend");
    checkpoint::Checkpoint ck(checkpoint_dir);
    data::ShardSet shards(data_dir, ck.config().vocab_size);
    shards.verify();  // a damaged shard would give a wrong loss, not an error
    const int64_t T = shards.seq_len();
    if (T > ck.config().max_seq_len) {
        throw error("{}: seq_len {} exceeds the model's max_seq_len {}", data_dir, T,
                    ck.config().max_seq_len);
    }
    int64_t rows = max_rows > 0 ? std::min(max_rows, shards.rows()) : shards.rows();
    const int64_t B = std::max<int64_t>(1, std::min(batch, rows));
    model::Llama model(ck.config(), k, B, T, model::Recompute::none);
    ck.load(model.layout(), model.params(), nullptr, nullptr, 0, 0, checkpoint::tensor_copy(k));
    model.sync_compute_weights();

    std::vector<int32_t> tokens(B * T), targets(B * T);
    EvalResult r;
    for (int64_t r0 = 0; r0 < rows; r0 += B) {
        for (int64_t b = 0; b < B; b++) {
            bool real = r0 + b < rows;  // a short last batch is padded with ignored rows
            shards.read_row(real ? r0 + b : 0, tokens.data() + b * T);
            for (int64_t i = 0; i < T; i++) {
                targets[b * T + i] = real && i + 1 < T ? tokens[b * T + i + 1] : -1;
            }
        }
        model.forward_backward(tokens.data(), targets.data(), 0.0f);
    }
    const model::LossSum l = model.take_loss();  // summed batch after batch
    r.tokens = l.tokens;
    r.rows = rows;
    r.loss = r.tokens > 0 ? l.sum / double(r.tokens) : 0;
    return r;
}

}  // namespace kiln::train
