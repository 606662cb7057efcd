// An edgelora package in the browser: one onnxruntime-web session for the base graph, one LoraAdapter per
// tenant, chosen per request. Nothing here is edgelora code beyond reading the manifest: the graph's slots
// take the adapter blobs as onnxruntime's own LoRA adapters, and the tokenizer is the package's
// tokenizer.json read by tokenizers.js.
import * as ort from 'onnxruntime-web';
import { Tokenizer } from '@huggingface/tokenizers';

const PAST_PREFIX = 'past_key_values.';

async function fetchJson(url, optional = false) {
  const response = await fetch(url);
  if (!response.ok) {
    if (optional) return {};
    throw new Error(`${url}: HTTP ${response.status}`);
  }
  return response.json();
}

const int64 = (values, dims) => new ort.Tensor('int64', BigInt64Array.from(values, BigInt), dims);

function argmax(values, offset, length) {
  let best = 0;
  for (let i = 1; i < length; i++) if (values[offset + i] > values[offset + best]) best = i;
  return best;  // the first of equal maxima, as numpy's argmax
}

export class EdgePackage {
  constructor(baseUrl, manifest, session, tokenizer) {
    this.baseUrl = baseUrl;
    this.manifest = manifest;
    this.session = session;
    this.tokenizer = tokenizer;
    const { graph } = manifest;
    this.pastNames = graph.inputs.filter((name) => name.startsWith(PAST_PREFIX));
    this.emptyPast = [1, graph.num_kv_heads, 0, graph.head_dim];
    this.eos = new Set(manifest.generation?.eos_token_ids ?? []);
    this.loaded = new Map();  // adapter name -> Promise<ort.LoraAdapter>, each blob fetched once
  }

  get adapters() {
    return Object.keys(this.manifest.adapters).sort();
  }

  adapter(name) {
    const entry = this.manifest.adapters[name];
    if (!entry) throw new Error(`unknown adapter ${JSON.stringify(name)}; this package has: ${this.adapters.join(', ')}`);
    if (!this.loaded.has(name)) this.loaded.set(name, ort.LoraAdapter.create(new URL(entry.file, this.baseUrl).href));
    return this.loaded.get(name);
  }

  encode(text) {
    return this.tokenizer.encode(text).ids;
  }

  // Greedy generation with the KV cache: the prompt in one pass, then one token per pass, each pass's present
  // keys and values fed back as the next one's past. `adapter` is a name from the manifest or null (the base).
  // `onToken(result)` sees the result so far after every new token; generation waits for the promise it may
  // return (outside the timings), which lets a page yield to the browser to paint.
  async generate(prompt, adapter = null, { maxNewTokens = 32, onToken = () => {} } = {}) {
    const runOptions = adapter === null ? {} : { activeLoraAdapters: [await this.adapter(adapter)] };
    const promptIds = this.encode(prompt);
    const vocab = this.manifest.graph.vocab_size;
    const result = { text: '', tokenIds: [], finishReason: 'length', promptTokens: promptIds.length,
                     prefillMs: 0, decodeMs: 0, msPerToken: 0 };
    let past = Object.fromEntries(this.pastNames.map((name) => [name, new ort.Tensor('float32', new Float32Array(0), this.emptyPast)]));
    let fed = promptIds;
    let total = promptIds.length;
    for (let step = 0; step < maxNewTokens; step++) {
      const start = total - fed.length;
      // the only inputs fed: slot factors come from the active adapter, and any other input the graph has
      // (such as lora_rows, the Python runtime's per-row adapter mask) keeps its default, as in plain onnxruntime
      const feeds = {
        input_ids: int64(fed, [1, fed.length]),
        attention_mask: int64(new Array(total).fill(1), [1, total]),  // GroupQueryAttention takes masks of ones
        position_ids: int64(fed.map((_, i) => start + i), [1, fed.length]),
        ...past,
      };
      const t0 = performance.now();
      const outputs = await this.session.run(feeds, runOptions);
      const ms = performance.now() - t0;
      if (step === 0) result.prefillMs = ms; else result.decodeMs += ms;
      const token = argmax(outputs.logits.data, (fed.length - 1) * vocab, vocab);
      result.tokenIds.push(token);
      result.msPerToken = result.decodeMs / Math.max(result.tokenIds.length - 1, 1);
      if (this.eos.has(token)) {
        result.finishReason = 'eos';
        await onToken(result);
        break;
      }
      result.text = this.tokenizer.decode(result.tokenIds, { skip_special_tokens: true });
      await onToken(result);
      past = Object.fromEntries(this.pastNames.map((name) => [name, outputs[name.replace('past_key_values', 'present')]]));
      fed = [token];
      total += 1;
    }
    return result;
  }
}

// Open the package folder at `baseUrl`: manifest, graph with its external data, tokenizer.
// `threads` > 1 needs a cross-origin isolated page (COOP/COEP headers), as `edgelora web` serves it.
export async function openPackage(baseUrl, { threads = 1 } = {}) {
  baseUrl = new URL(baseUrl.endsWith('/') ? baseUrl : `${baseUrl}/`, globalThis.location?.href).href;
  const url = (file) => new URL(file, baseUrl).href;
  const manifest = await fetchJson(url('edgelora.json'));
  if (manifest.task !== 'causal-lm' || manifest.mode !== 'separate') {
    throw new Error(`${url('edgelora.json')}: this page runs causal-lm packages in separate mode`);
  }
  if (!manifest.tokenizer) throw new Error(`${url('edgelora.json')}: the package has no tokenizer`);
  ort.env.wasm.numThreads = threads;
  const graphFile = manifest.graph.file;
  const session = await ort.InferenceSession.create(url(graphFile), {
    executionProviders: ['wasm'],
    // the exporter writes the weights beside the graph, named after it; the graph names the file by its base name
    externalData: [{ path: `${graphFile.split('/').pop()}.data`, data: url(`${graphFile}.data`) }],
  });
  const [tokenizerJson, tokenizerConfig] = await Promise.all([
    fetchJson(url(manifest.tokenizer)), fetchJson(url('tokenizer_config.json'), true)]);
  return new EdgePackage(baseUrl, manifest, session, new Tokenizer(tokenizerJson, tokenizerConfig));
}
