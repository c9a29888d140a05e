// Loads GGUF files in llama.cpp (node-llama-cpp's prebuilt CPU binary) and answers what
// tests/export/test_gguf.cpp asks, as one JSON line on stdout. The request (a JSON file) holds
// {"models": [{"path": FILE, ...questions}]}; for each model the answer holds:
//   "texts": [...]             -> "tokens": llama.cpp's ids of each text (no BOS added)
//   "prompt": [ids], "n": N    -> "greedy": the N likeliest-next tokens after the prompt ids
//                                 (temperature 0), ending early after EOS
//   "perplexity": [[ids]...]   -> "nll", "count": the summed -log p(token | the ones before it)
//                                 over every token after each sequence's first, each sequence
//                                 evaluated from an empty context
// usage: node check.mjs REQUEST.json
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const answers = [];

for (const q of request.models) {
    const model = await llama.loadModel({modelPath: q.path});
    const out = {};
    if (q.texts) {
        out.tokens = q.texts.map((text) => Array.from(model.tokenize(text, false)));
    }
    const longest = Math.max((q.prompt ?? []).length + (q.n ?? 0),
                             ...(q.perplexity ?? []).map((s) => s.length));
    const context = await model.createContext({contextSize: Math.max(64, longest + 8)});
    const sequence = context.getSequence();
    if (q.prompt) {
        const greedy = [];
        for await (const token of sequence.evaluate(q.prompt, {temperature: 0})) {
            greedy.push(token);
            if (greedy.length >= q.n || token === model.tokens.eos) break;
        }
        out.greedy = greedy;
    }
    if (q.perplexity) {
        let nll = 0, count = 0;
        for (const ids of q.perplexity) {
            await sequence.clearHistory();
            const input = ids.map((id, k) =>
                k + 1 < ids.length ? [id, {generateNext: {probabilities: true}}] : id);
            const results = await sequence.controlledEvaluate(input);
            for (let k = 0; k + 1 < ids.length; k++) {
                const p = results[k].next.probabilities.get(ids[k + 1]) ?? 0;
                nll -= Math.log(Math.max(p, 1e-30));
                count++;
            }
        }
        out.nll = nll;
        out.count = count;
    }
    answers.push(out);
    await context.dispose();
    await model.dispose();
}

process.stdout.write(JSON.stringify({models: answers}) + "\n");
await llama.dispose();
