"""`ember` command line: pull, list, generate, chat, history, serve, bench, eval. All consume the engine's one
stream."""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ember.cli.history import history_app
from ember.cli.structured import ChoiceOpt, GrammarOpt, JsonOpt, RegexOpt, SchemaOpt, structured_option
from ember.errors import EmberError

app = typer.Typer(
    name="ember",
    help="ember — a local LLM runtime. Run GGUF models on your CPU or GPU: generate, chat, batch.\n\n"
    "The default model (smollm2-135m, SmolLM2-135M-Instruct) is pulled on first use.\n\n"
    "Examples:\n\n  ember generate \"The capital of France is\" --max-tokens 16\n\n"
    "  ember chat --system \"You are terse.\"\n\n  ember pull gemma3-270m",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model alias (see `ember list`), a .gguf path or a Hugging Face model directory.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, npu or auto (cuda > npu > cpu).")]
DtypeOpt = Annotated[str, typer.Option(help="Compute dtype: auto, float32, bfloat16, float16.")]
TemplateOpt = Annotated[str | None, typer.Option("--chat-template", help="Jinja chat template FILE to use instead of the model's, or a built-in: chatml, plain.")]
CtxOpt = Annotated[int | None, typer.Option("--max-model-len", help="Context length to allow (default: the model's).")]
KvOpt = Annotated[str | None, typer.Option(
    "--kv-cache-memory", help="Memory for the KV cache, e.g. 512MB or 2GiB (default: a fifth of the free RAM, "
    "at most 2 GiB; of the free GPU memory on a GPU).")]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | None) -> int | None:
    """'512MB', '2GiB', '1.5gb' or a byte count -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise EmberError(f"--kv-cache-memory {text!r}: give a size such as 512MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Quantize(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"
    int8 = "int8"


QuantOpt = Annotated[Quantize | None, typer.Option(
    "--quantize", help="Quantize the linear layers on load (not the output head): nf4 or fp4 (4-bit, via "
    "bitsandbytes), int8 (per-channel weight-only).", case_sensitive=False)]


# what the CLI uses for a knob the user did not set and the model's generation_config.json does not name
GENERATE_DEFAULTS = {"max_tokens": 256, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                     "repetition_penalty": 1.0}
CHAT_DEFAULTS = {**GENERATE_DEFAULTS, "max_tokens": 512, "temperature": 0.7}


def sampling_options(knobs: dict[str, Any], fallback: dict[str, Any], model_defaults: dict[str, Any] | None,
                     presence_penalty: float, frequency_penalty: float, seed: int | None, stop: list[str] | None,
                     min_tokens: int = 0, ignore_eos: bool = False, structured: dict[str, Any] | None = None):
    """Each knob: the user's value, else the model's generation_config.json default, else `fallback`.
    Called once before loading (to check the values early) and once after, with the model's defaults."""
    from ember.sampling_params import SamplingParams

    chosen = {k: v if v is not None else (model_defaults or {}).get(k, fallback[k]) for k, v in knobs.items()}
    return SamplingParams(**chosen, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                          seed=seed, stop=stop or [], min_tokens=min_tokens, ignore_eos=ignore_eos,
                          structured=structured)


def load_model(model: str | None, device: str, dtype: str, chat_template: str | None, max_model_len: int | None,
               quantize: Quantize | None = None, kv_cache_memory: str | None = None, **engine: Any):
    import ember

    err = sys.stderr
    kv_bytes = parse_size(kv_cache_memory)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as notes:  # one line each, not Python's two-line format
        llm = ember.load(model, device=device, dtype=dtype, chat_template=chat_template, kv_cache_memory=kv_bytes,
                         max_model_len=max_model_len, quantize=quantize.value if quantize else None, quiet=False,
                         **engine)
    for note in notes:
        print(f"[ember] warning: {note.message}", file=err)
    print(f"[ember] {llm!r} loaded in {time.perf_counter() - t0:.1f}s", file=err)
    kv = llm.engine.kv
    print(f"[ember] KV cache: {kv.bytes / 2**20:.0f} MiB = {kv.num_blocks} blocks of {kv.block_size} tokens "
          f"({kv.capacity_tokens:,} tokens; set --kv-cache-memory to change)", file=err)
    return llm


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue ('-' reads standard input).")],
    model: ModelOpt = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens to generate [default: 256]*.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (deterministic) [default: 0.8]*.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep the k most likely tokens (0 = off) [default: 40]*.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (1 = off) [default: 0.95]*.")] = None,
    min_p: Annotated[float | None, typer.Option(
        help="Drop tokens below min_p x the top probability (0 = off) [default: 0.05]*.")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(
        help="> 1 discourages repeats (1 = off) [default: 1]*. *Unless the model's generation_config.json sets "
             "it.")] = None,
    presence_penalty: Annotated[float, typer.Option(help="OpenAI-style, -2..2.")] = 0.0,
    frequency_penalty: Annotated[float, typer.Option(help="OpenAI-style, -2..2.")] = 0.0,
    min_tokens: Annotated[int, typer.Option(help="Generate at least this many tokens.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Same seed, same text.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this string (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past end-of-sequence tokens.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message through the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_model_len: CtxOpt = None,
    quantize: QuantOpt = None,
    kv_cache_memory: KvOpt = None,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Print token counts and speed to stderr.")] = True,
    json_schema: SchemaOpt = None,
    json_object: JsonOpt = False,
    regex: RegexOpt = None,
    choice: ChoiceOpt = None,
    grammar: GrammarOpt = None,
) -> None:
    """Stream a continuation of PROMPT to standard output.

    With --json-schema / --json / --regex / --choice / --grammar every token is constrained, so the output
    always has that shape (unless --max-tokens cuts it: finish_reason=length). Pair it with --chat and a
    prompt that asks for it: the constraint decides the form, the model still decides the content.
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    if system is not None and not chat:
        raise EmberError("--system only applies with --chat (it is a chat message)")
    knobs = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty)
    structured = structured_option(json_schema, json_object, regex, choice, grammar)
    rest = (presence_penalty, frequency_penalty, seed, stop, min_tokens, ignore_eos, structured)
    sampling_options(knobs, GENERATE_DEFAULTS, None, *rest)  # bad values fail before the model loads
    llm = load_model(model, device, dtype, chat_template, max_model_len, quantize, kv_cache_memory)
    params = sampling_options(knobs, GENERATE_DEFAULTS, llm.generation_defaults, *rest)
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        stream = llm.chat(msgs, params, stream=True)
    else:
        stream = llm.stream(prompt, params)
    t0 = time.perf_counter()
    t_first = None
    last = None
    for out in stream:
        if t_first is None:
            t_first = time.perf_counter()
        sys.stdout.write(out.text)
        sys.stdout.flush()
        last = out
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    if stats and last is not None and t_first is not None:
        n = last.usage.completion_tokens
        decode = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else float("nan")
        print(f"[ember] prompt {last.usage.prompt_tokens} tokens, first token {1000 * (t_first - t0):.0f} ms; "
              f"{n} tokens, decode {decode:.1f} tok/s; finish_reason={last.finish_reason}", file=sys.stderr)


@app.command(name="chat")
def chat_cmd(
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="System message for the conversation.")] = None,
    input_file: Annotated[Path | None, typer.Option("-i", "--input", help="Load a saved conversation (JSON) and continue it.")] = None,
    output_file: Annotated[Path | None, typer.Option("-o", "--output", help="Save the conversation here (JSON).")] = None,
    io_file: Annotated[Path | None, typer.Option("-io", "--io", help="Load from and save to this file.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens per reply [default: 512]*.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy [default: 0.7]*.")] = None,
    top_k: Annotated[int | None, typer.Option(help="0 = off [default: 40]*.")] = None,
    top_p: Annotated[float | None, typer.Option(help="1 = off [default: 0.95]*.")] = None,
    min_p: Annotated[float | None, typer.Option(help="0 = off [default: 0.05]*.")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(
        help="1 = off [default: 1]*. *Unless the model's generation_config.json sets it.")] = None,
    presence_penalty: Annotated[float, typer.Option()] = 0.0,
    frequency_penalty: Annotated[float, typer.Option()] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible replies.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop strings (repeatable).")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_model_len: CtxOpt = None,
    quantize: QuantOpt = None,
    kv_cache_memory: KvOpt = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue a stored conversation: --resume (the last one) or --resume ID "
        "(see `ember history list`).")] = None,
) -> None:
    """Chat with a model. Type `exit`, `quit`, `bye` or Ctrl-D to leave (the history is saved);
    Ctrl-C stops a reply while it streams. Every turn is also kept in the conversation store
    (`ember history`)."""
    from ember.cli.chat import ChatSession
    from ember.hub import DEFAULT_MODEL
    from ember.store import Store, chat_messages

    if io_file is not None and (input_file is not None or output_file is not None):
        raise EmberError("use either -io FILE, or -i FILE and/or -o FILE, not both")
    if resume is not None and (io_file is not None or input_file is not None):
        raise EmberError("--resume continues a stored conversation: give it or -i/-io FILE, not both")
    load_from = io_file or input_file
    save_to = io_file or output_file
    knobs = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=repetition_penalty)
    rest = (presence_penalty, frequency_penalty, seed, stop)
    sampling_options(knobs, CHAT_DEFAULTS, None, *rest)  # bad values fail before the model loads
    history = ChatSession.read_history(load_from) if load_from else []
    cid = None
    try:
        store: Store | None = Store()
    except EmberError as e:
        if resume is not None:
            raise
        print(f"[ember] warning: {e}; this chat is not stored (its JSON history still is)", file=sys.stderr)
        store = None
    if store is not None and resume is not None:
        if resume == RESUME_LAST:
            cid = store.last()
            if cid is None:
                raise EmberError("no stored conversation to resume yet: start one with `ember chat`")
        elif resume.isdigit():
            cid = int(resume)
        else:
            raise EmberError(f"--resume {resume!r}: give a conversation id (see `ember history list`), or "
                             "nothing for the last one")
        history = chat_messages(store.get(cid))
    llm = load_model(model, device, dtype, chat_template, max_model_len, quantize, kv_cache_memory)
    params = sampling_options(knobs, CHAT_DEFAULTS, llm.generation_defaults, *rest)
    ChatSession(llm, params, history, system=system, save_to=save_to, store=store, conversation_id=cid,
                model_name=Path(model).name if model and os.path.exists(model) else model or DEFAULT_MODEL).run()


@app.command()
def bench(
    model: ModelOpt = None,
    vs: Annotated[list[str] | None, typer.Option("--vs", help="Peer to measure in the same run: transformers, llama.cpp (repeatable; llama.cpp's "
                                                  "llama-bench on PATH or $LLAMA_BENCH, else llama-cpp-python; "
                                                  "$LLAMA_BENCH=A:B measures both builds and compares ember "
                                                  "with the faster). "
                                                  "With --concurrency: llama.cpp's server (llama-server on PATH or "
                                                  "$LLAMA_SERVER) under the same load.")] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens for the prefill measurement.")] = 128,
    gen_len: Annotated[int, typer.Option(help="Tokens generated for the decode measurement.")] = 64,
    trials: Annotated[int, typer.Option(help="Measured trials after one warm-up; medians are reported.")] = 3,
    threads: Annotated[int | None, typer.Option(help="CPU threads for every engine (default: all cores).")] = None,
    quantize: QuantOpt = None,
    concurrency: Annotated[list[int] | None, typer.Option(
        "--concurrency", help="Serving benchmark instead: N requests at once (repeatable, e.g. 1 4 16 64); "
                              "aggregate tok/s, time to first token, inter-token latency.")] = None,
) -> None:
    """Measure load time, prefill and decode speed (batch 1), weights GB/s and peak RSS, beside peers.

    Each engine runs in its own process on the same file, prompt and thread count. With --concurrency,
    measure continuous batching instead: N distinct prompts of --prompt-len tokens arrive at once and
    each generates --gen-len tokens."""
    from ember import bench as b
    from ember import bench_llama_cpp, kernels
    from ember.hub import DEFAULT_MODEL, resolve_model

    peers = list(vs or [])
    # llama.cpp's own benchmark program, preferred to the Python binding when both are there
    llama_benches = bench_llama_cpp.bench_builds()
    for p in peers:
        if p not in b.ENGINES[1:]:
            raise EmberError(f"--vs {p!r}: unknown peer; choose from {', '.join(b.ENGINES[1:])}")
        if concurrency:  # the serving benchmark drives llama.cpp's own server, not the Python binding
            if p != "llama.cpp":
                raise EmberError(f"--concurrency runs against llama.cpp's server only, not --vs {p}")
            if bench_llama_cpp.binary() is None:
                raise EmberError(bench_llama_cpp.HELP)
        elif not (p == "llama.cpp" and llama_benches) and not b.available(p):
            pkg = {"transformers": "pip install transformers accelerate",
                   "llama.cpp": "pip install llama-cpp-python, or llama-bench on PATH / $LLAMA_BENCH"}[p]
            raise EmberError(f"--vs {p}: not installed ({pkg}); ember never requires it")
    if prompt_len < 1 or gen_len < 2 or trials < 1:
        raise EmberError("--prompt-len >= 1, --gen-len >= 2 and --trials >= 1 are needed")
    path = resolve_model(model or DEFAULT_MODEL)
    if path.is_dir() and "llama.cpp" in peers:
        raise EmberError("--vs llama.cpp needs a .gguf file; this model is a Hugging Face directory")
    n_threads = threads or os.cpu_count() or 1
    ids = b.prompt_ids(path, prompt_len)
    quant = quantize.value if quantize else None
    print(f"[bench] {path.name}: prompt {len(ids)} tokens, {gen_len} generated, {trials} trials, "
          f"{n_threads} threads, ember's kernels: {kernels.isa()}"
          + (f", ember quantized to {quant} on load (peers as stored)" if quant else ""), file=sys.stderr)
    if concurrency:
        if quant or any(c < 1 for c in concurrency):
            raise EmberError("--concurrency takes counts >= 1 (and no --quantize yet)")
        serving = []
        for c in concurrency:
            print(f"[bench] {c} concurrent requests ...", file=sys.stderr)
            try:
                serving.append(b.run_engine("ember-serving", path, ids, gen_len, c, n_threads))
                if peers:
                    serving.append(bench_llama_cpp.run(path, ids, gen_len, c, n_threads))
            except RuntimeError as e:
                raise EmberError(str(e)) from None
        print(b.serving_table(serving))  # type: ignore[arg-type]
        return
    results = []
    for engine in ["ember", *peers]:
        print(f"[bench] running {engine} ...", file=sys.stderr)
        try:
            if engine == "llama.cpp" and llama_benches:
                for label, exe in llama_benches:
                    results.append(bench_llama_cpp.llama_bench(path, len(ids), gen_len, trials, n_threads, exe, label))
                continue
            results.append(b.run_engine(engine, path, ids, gen_len, trials, n_threads,
                                        quant if engine == "ember" else None))
        except RuntimeError as e:
            raise EmberError(str(e)) from None
    size = b.weight_bytes(path)
    print(b.table(results, size))
    if best := bench_llama_cpp.best_peer_line(results):
        print(best, file=sys.stderr)
    print(b.bandwidth_line(results, size, b.read_bandwidth(n_threads)), file=sys.stderr)


@app.command()
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="EMBER_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health (or set EMBER_API_KEY).")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="The model id clients send (default: the alias, or the file name without .gguf).")] = None,
    chat_template: TemplateOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_model_len: CtxOpt = None,
    quantize: QuantOpt = None,
    kv_cache_memory: KvOpt = None,
    max_num_seqs: Annotated[int, typer.Option(
        help="Requests generating at once; more wait in line (first come, first served).")] = 64,
    max_num_batched_tokens: Annotated[int | None, typer.Option(
        help="Tokens one engine step computes, prompt chunks included (default: 256 on a CPU, 512 on a GPU, at least --max-num-seqs). "
             "Smaller: running streams wait less behind a long prompt.")] = None,
    replicas: Annotated[int | None, typer.Option(
        help="Run N engine replicas on Ray Serve behind this one endpoint (needs `pip install 'ember[ray]'`); "
             "a conversation's turns go to the replica that holds its prefix.", min=1)] = None,
    max_replicas: Annotated[int | None, typer.Option(
        help="Autoscale between --replicas and this many on ongoing requests (Ray Serve).", min=1)] = None,
    replica_cpus: Annotated[float | None, typer.Option(
        help="CPUs (and threads) per replica [default: this machine's CPUs / --replicas].")] = None,
    replica_gpus: Annotated[float, typer.Option(help="GPUs per replica (fractions share one).")] = 0,
    stream_interval: Annotated[int, typer.Option(
        help="Ray Serve: tokens per streamed chunk after the first (default 1); more means fewer messages "
             "through Ray at many streams, in coarser steps.", min=1)] = 1,
    ray_address: Annotated[str | None, typer.Option(
        help="Join this Ray cluster (e.g. auto, or HEAD_IP:6379 after `ray start --head`) instead of starting "
             "a local Ray instance.")] = None,
    no_ui: Annotated[bool, typer.Option(
        "--no-ui", help="No chat page at http://HOST:PORT/ (the API only).")] = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /metrics, /health) and a chat page at / (conversations saved in $EMBER_HOME, shared with
    `ember chat` and `ember history`), batching all requests in one engine, or in --replicas N engines on
    Ray Serve (on this machine, or a cluster with --ray-address).

    Point any OpenAI client at http://HOST:PORT/v1 (e.g. OpenAI(base_url="http://127.0.0.1:8000/v1",
    api_key="KEY or anything")). Unsupported request fields get a 400 naming them, never ignored."""
    import socket

    import uvicorn

    from ember.hub import DEFAULT_MODEL, resolve_model
    from ember.server.app import build_app
    from ember.server.engine_client import LocalEngine

    if not 0 < port < 65536:
        raise EmberError(f"--port {port}: give a port between 1 and 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise EmberError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None
    name = served_model_name or (Path(model).stem if model and model.endswith(".gguf") else model or DEFAULT_MODEL)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"[ember] warning: listening on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    if replicas is not None or ray_address is not None or max_replicas is not None:
        from ember.cli.cluster import serve_on_ray

        load = {"device": device, "dtype": dtype, "chat_template": chat_template, "max_model_len": max_model_len,
                "quantize": quantize.value if quantize else None, "kv_cache_memory": parse_size(kv_cache_memory),
                "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens}
        serve_on_ray(model or DEFAULT_MODEL, name, api_key, load, host, port, replicas or 1, max_replicas,
                     replica_cpus, replica_gpus, ray_address, stream_interval, ui=not no_ui)
        return
    if replica_cpus is not None or replica_gpus or stream_interval != 1:
        raise EmberError("--replica-cpus / --replica-gpus / --stream-interval apply to Ray Serve replicas: "
                         "add --replicas N")
    # pulled here, on the main thread, so Ctrl-C during a download still cleans up its partial files; then
    # loaded on the engine's own thread, the one that will step it (see AsyncEngine: one OpenMP pool)
    path = str(resolve_model(model or DEFAULT_MODEL, quiet=False))
    engine = LocalEngine(lambda: load_model(path, device, dtype, chat_template, max_model_len, quantize,
                                            kv_cache_memory, max_num_seqs=max_num_seqs,
                                            max_num_batched_tokens=max_num_batched_tokens))
    where = base_url(host, port)
    print(f"[ember] serving '{name}' at {where}/v1 (OpenAI API)" + (", API key required" if api_key else "")
          + ("" if no_ui else f"; chat page at {where}/"), file=sys.stderr)
    app = build_app(engine.llm.frontend(), engine, name, api_key, ui=not no_ui)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Model alias (smollm2-135m, gemma3-270m; see `ember list`) or a "
                                             "Hugging Face repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct.")],
    force: Annotated[bool, typer.Option("--force", help="Alias: download and verify again even when cached.")] = False,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Repo: only files matching this glob (repeatable), e.g. '*Q4_K_M.gguf'.")] = None,
    revision: Annotated[str | None, typer.Option(help="Repo: branch, tag or commit (default: main).")] = None,
) -> None:
    """Download a model and print its local path.

    An alias goes to the cache (EMBER_HOME, default ~/.cache/ember), sha256-checked. A repo id goes to
    huggingface_hub's cache: HF_ENDPOINT picks a mirror, HF_TOKEN unlocks private and gated repos, an
    interrupted download resumes, and a cached model later loads without the network."""
    from ember.hub import pull as do_pull

    print(do_pull(name, force=force, include=include, revision=revision))


@app.command(name="list")
def list_cmd() -> None:
    """List known model aliases and the models in the cache."""
    from ember.hub import ember_home, list_models

    rows = list_models()
    print(f"{'NAME':<16} {'SIZE':>9}  {'CACHED':<6}  DESCRIPTION")
    for r in rows:
        size = f"{r.size / 1e6:.0f} MB" if r.size else "?"
        mark = "yes" if r.cached else "no"
        name = r.name + (" *" if r.is_default else "")
        print(f"{name:<16} {size:>9}  {mark:<6}  {r.description}")
    print(f"\n* default model. Cache: {ember_home()}. Any local .gguf path or Hugging Face model directory works wherever a model is named.")


eval_app = typer.Typer(
    help="Measure a model's quality: perplexity over a text file, or bitsandbytes' pi-digits check.\n\n"
    "Examples:\n\n  ember eval ppl smollm2-135m essay.txt --quantize nf4\n\n  ember eval pi --quantize int8",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(eval_app, name="eval")


@eval_app.command(name="ppl")
def eval_ppl(
    model: Annotated[str, typer.Argument(help="Model alias (see `ember list`) or a .gguf path.")],
    file: Annotated[Path, typer.Argument(help="UTF-8 text file to score.")],
    quantize: QuantOpt = None,
    window: Annotated[int | None, typer.Option(help="Tokens per scoring window (default: the context, at most 1024).")] = None,
    stride: Annotated[int | None, typer.Option(help="Tokens a window advances by (default: half the window).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Perplexity of MODEL on the text in FILE: exp of the mean next-token loss (lower is better).

    A text longer than the window is read in overlapping windows; every token is scored once."""
    from ember.eval import perplexity

    if not file.is_file():
        raise EmberError(f"{file}: no such file (give a UTF-8 text file to score)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EmberError(f"{file} is not UTF-8 text") from None
    if not text.strip():
        raise EmberError(f"{file} is empty: there is nothing to score")
    llm = load_model(model, device, dtype, None, None, quantize)
    t0 = time.perf_counter()
    ppl, n = perplexity(llm, text, window=window, stride=stride)
    print(f"perplexity {ppl:.4f} over {n} tokens in {time.perf_counter() - t0:.1f} s")


@eval_app.command(name="pi")
def eval_pi(
    model: Annotated[str | None, typer.Argument(help="Model alias or .gguf path (default: smollm2-135m).")] = None,
    quantize: QuantOpt = None,
    samples: Annotated[int, typer.Option("-n", "--samples", help="Continuations to sample.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the first sample (sample i uses seed + i).")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Sample continuations of "3.14159" (temperature 0.7, top-p 0.9, 20 tokens) and count those that
    start with 3.141592653589793: the sanity check bitsandbytes runs on quantized models."""
    from ember.eval import pi_check

    llm = load_model(model, device, dtype, None, None, quantize)
    res = pi_check(llm, samples, seed)
    for i, text in enumerate(res.texts):
        print(f"{i + 1}: {text!r}")
    print(res)


def base_url(host: str, port: int) -> str:
    """http://HOST:PORT for the banner, an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


RESUME_LAST = "\0last"  # what a bare --resume becomes


def _bare_resume(argv: list[str]) -> list[str]:
    """`ember chat --resume` with no id means the last conversation (typer options need a value)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, RESUME_LAST)
            break
    return out


app.add_typer(history_app, name="history")


def main() -> None:
    try:
        app(args=_bare_resume(sys.argv[1:]))
    except EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
