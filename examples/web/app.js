// The page: pick a tenant, type an input, watch the answer stream in with its decode speed.
// ?package=URL opens another package folder (default: package/, as `edgelora web` serves it);
// ?threads=N runs onnxruntime-web on N WebAssembly threads (default 1).
import { openPackage } from './edgelora.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const BASE = '';  // the tenant select's value for the base model alone
// a task boundary, where the browser can paint the tokens so far
const yieldToBrowser = () => globalThis.scheduler?.yield?.() ?? new Promise((resolve) => setTimeout(resolve, 0));

function setState(state, message) {
  document.body.dataset.state = state;
  $('status').textContent = message;
}

function addHistoryRow(tenant, prompt, result) {
  const row = $('history').tBodies[0].insertRow(0);
  for (const cell of [tenant || '(base)', prompt, result.text, result.tokenIds.length, result.msPerToken.toFixed(2)]) {
    row.insertCell().textContent = cell;
  }
}

async function main() {
  const where = params.get('package') ?? 'package/';
  const threads = Number(params.get('threads') ?? 1);
  const t0 = performance.now();
  const pkg = await openPackage(where, { threads });
  const { graph } = pkg.manifest;
  for (const [value, label] of [...pkg.adapters.map((name) => [name, name]), [BASE, '(base)']]) {
    $('tenant').add(new Option(label, value));
  }
  $('generate').disabled = false;
  setState('ready', `${where}: ${graph.num_layers} layers, base ${graph.quantization}, ${pkg.adapters.length} adapters `
    + `(${pkg.manifest.adapter_dtype}); opened in ${(performance.now() - t0).toFixed(0)} ms on ${threads} thread(s)`);

  $('ask').addEventListener('submit', async (event) => {
    event.preventDefault();
    const tenant = $('tenant').value;
    const prompt = $('prompt').value;
    $('generate').disabled = true;
    setState('busy', `generating with ${tenant || 'the base'}…`);
    const show = (result) => {
      $('answer').textContent = result.text;
      $('answer').dataset.tokenIds = JSON.stringify(result.tokenIds);
      $('speed').dataset.msPerToken = result.msPerToken;
      $('speed').textContent = `${result.tokenIds.length} tokens · prefill ${result.prefillMs.toFixed(1)} ms`
        + ` (${result.promptTokens} prompt tokens) · decode ${result.msPerToken.toFixed(2)} ms/token`;
    };
    try {
      const result = await pkg.generate(prompt, tenant || null,
        { maxNewTokens: Number($('max-new-tokens').value), onToken: (partial) => { show(partial); return yieldToBrowser(); } });
      show(result);
      addHistoryRow(tenant, prompt, result);
      setState('ready', `done: ${tenant || '(base)'}, finish ${result.finishReason}`);
    } catch (error) {
      setState('error', `error: ${error.message}`);
    } finally {
      $('generate').disabled = false;
    }
  });
}

main().catch((error) => setState('error', `error: ${error.message}`));
