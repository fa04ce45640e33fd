"""The `algpt2` command line: parses argv, calls the library, prints.

Every subcommand is a thin layer over a library function. Bad input (a
`ValueError`, a missing file) prints `algpt2: error: ...` and exits with 2.
This module imports no TensorFlow at the top: `algpt2 --help` and `algpt2
info` answer without it (see `algpt2_command.py`).
"""

import argparse
import itertools
import json
import os
import sys
import warnings

from algpt2_tf.runtime import xla_cache


class UsageError(ValueError):
    """Bad command-line input; reported with exit code 2."""


# ----------------------------------------------------------------------- info
def _info(args):
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.config import ALGPT2Config, list_presets

    if args.preset:
        config = ALGPT2Config.from_preset(args.preset)
        print(json.dumps({"preset": args.preset, "parameters": config.num_parameters(),
                          "config": config.to_dict()}, indent=2))
        return
    rows = ["| preset | hidden | layers | heads | E | blocks | parameters |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name in list_presets():
        c = ALGPT2Config.from_preset(name)
        rows.append(f"| {name} | {c.hidden_size} | {c.num_layers} | {c.num_heads} | "
                    f"{c.embedding_size or '-'} | {c.num_layer_groups} | {c.num_parameters():,} |")
    print("\n".join(rows))
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.pretrained import list_pretrained

    print(f"\nPretrained (--model NAME): {', '.join(list_pretrained()) or 'none'}")


# ------------------------------------------------------------------ tokenizer
def _tokenizer_train(args):
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.runtime.files import expand_files, read_documents
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.tokenizer import train_tokenizer

    paths = expand_files(args.files)
    documents = list(read_documents(paths))
    if not documents:
        raise UsageError(f"The files hold no text: {', '.join(paths)}.")
    tokenizer = train_tokenizer(documents, args.vocab_size, args.out,
                                min_frequency=args.min_frequency)
    print(f"Trained a byte-level BPE of {tokenizer.vocab_size} ids on {len(paths)} file(s) "
          f"-> {args.out} (tokenizer.json, vocab.json, merges.txt)")


def _prepare(args):
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.tokenizer import GPT2Tokenizer
    # Deferred: imports TensorFlow, Keras, NumPy.
    from algpt2_tf.training.data import default_cache_dir, prepare_corpus

    tokenizer = GPT2Tokenizer(args.tokenizer)
    out = args.out or default_cache_dir(args.files, tokenizer, args.valid_fraction)
    meta = prepare_corpus(args.files, out, tokenizer, valid_fraction=args.valid_fraction,
                          text_key=args.text_key)
    print(json.dumps({"cache_dir": out, "documents": meta["documents"],
                      "train_tokens": meta["train_tokens"], "valid_tokens": meta["valid_tokens"]},
                     indent=2))


def _train(args):
    # Deferred: imports TensorFlow, Keras, NumPy.
    from algpt2_tf.training.trainer import TrainingDiverged, TrainOptions, train

    values = {k: v for k, v in vars(args).items() if k in TrainOptions.__dataclass_fields__}
    if "preset" not in values:
        values["preset"] = None if args.config or args.init_model else TrainOptions.preset
    options = TrainOptions(**values)
    try:
        train(options)
    except TrainingDiverged as e:
        print(f"algpt2 train: {e}", file=sys.stderr)
        return 1


def _texts(patterns, empty_message):
    """The documents of the files matching `patterns`; a usage error when there are none."""
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.runtime.files import expand_files, read_documents

    texts = list(read_documents(expand_files(patterns)))
    if not texts:
        raise UsageError(empty_message)
    return texts


def _positive(args, *names):
    """Usage errors for options that must be positive integers when given."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def _writable_file(path, flag):
    """Checks, before any work, that `path` can be written as a file."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file path.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: the folder {parent} does not exist.")


def _evaluate(args):
    from algpt2_tf.evaluation import evaluate_texts  # deferred: imports Keras, NumPy
    # The network alone: the task class would import TensorFlow for generation on any backend.
    from algpt2_tf.model import ALGPT2Backbone  # deferred: imports Keras, NumPy
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.saving import load_model, load_tokenizer_for

    _positive(args, "seq_len", "stride", "batch_size")
    _writable_file(args.json, "--json")
    model = load_model(args.model, ALGPT2Backbone)
    tokenizer = load_tokenizer_for(args.model)
    texts = _texts(args.files, "The files hold no text to evaluate.")
    result = evaluate_texts(model, tokenizer, texts, seq_len=args.seq_len, stride=args.stride,
                            batch_size=args.batch_size, verbose=0 if args.quiet else 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")


# ------------------------------------------------------------------ generate
def _generate(args):
    from algpt2_tf.generation.sampling import sampling_params  # deferred: imports NumPy
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.saving import load_tokenizer_for

    _positive(args, "max_new_tokens")
    if not 0 <= args.seed < 2 ** 31:
        raise UsageError(f"--seed must be in [0, 2**31), got {args.seed}.")
    prompt = _prompt_text(args.prompt)
    params = sampling_params(args.sampler, args.temperature, args.top_k, args.top_p,
                             args.repetition_penalty)
    tokenizer = load_tokenizer_for(args.model)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    stop_ids = [tokenizer.eos_id] + list(args.stop_id or [])
    build = _litert_build(args)
    if build is not None:  # no TensorFlow in this process unless the build was made now
        from algpt2_tf.export.litert_engine import LiteRTGenerator  # deferred: imports NumPy
        # Deferred: the command's own module (`--help` stays fast).
        from algpt2_tf.runtime.tf_startup import LITERT_NOISE, quiet_stderr

        weights = "float32" if build.quantize == "none" else build.quantize
        print(f"algpt2 generate: engine litert ({weights} build {build.folder})",
              file=sys.stderr)
        with quiet_stderr(LITERT_NOISE):  # LiteRT logs its loading; the first token with it
            generator = LiteRTGenerator(build)
            generator.check(ids, args.max_new_tokens)  # before any output
            tokens = generator.stream(ids, args.max_new_tokens, params, args.seed, stop_ids)
            first = next(tokens)
        _write_stream(prompt, itertools.chain([first], tokens), tokenizer, stop_ids)
        with quiet_stderr(LITERT_NOISE):  # and its teardown
            generator.close()
        return
    if _backend_chosen(args) != "tensorflow":
        _generate_host_loop(args, prompt, ids, params, stop_ids, tokenizer)
        return
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.runtime.tf_startup import import_tensorflow_quietly

    compile_cache = xla_cache.use()  # before TensorFlow reads its flags
    import_tensorflow_quietly()
    tricks = _decode_process_settings()  # before anything compiles
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras, NumPy
    # Deferred: imports TensorFlow, Keras, NumPy.
    from algpt2_tf.generation.generator import generator_for
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.saving import load_model

    model = load_model(args.model, ALGPT2LMHeadModel)
    generator = generator_for(model, tricks)
    generator.buckets(len(ids), args.max_new_tokens)  # validates the length before any output
    print("algpt2 generate: engine xla", file=sys.stderr)
    _write_stream(prompt, generator.stream(ids, args.max_new_tokens, params, args.seed,
                                           stop_ids), tokenizer, stop_ids)
    if compile_cache:  # this process's compiled programs are complete: trust them next time
        xla_cache.record(compile_cache)


def _generate_host_loop(args, prompt, ids, params, stop_ids, tokenizer):
    """torch / JAX: the network and the host loop, printed when done (no TensorFlow)."""
    from algpt2_tf.generation.host_loop import HostLoopGenerator  # deferred: imports Keras, NumPy
    from algpt2_tf.model import ALGPT2Backbone  # deferred: imports Keras, NumPy
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.saving import load_model

    model = load_model(args.model, ALGPT2Backbone)
    print(f"algpt2 generate: engine host loop ({_backend_chosen(args)})", file=sys.stderr)
    out = HostLoopGenerator(model).generate([ids], args.max_new_tokens, params, args.seed,
                                            stop_ids)
    new = [t for t in out.new_ids[0] if t not in stop_ids]
    sys.stdout.write(prompt + tokenizer.decode(new) + "\n")


def _litert_build(args):
    """The LiteRT build `generate` runs on, or None for the Keras/XLA path: `--engine
    litert` builds it when missing; `auto` uses it only when a current one is cached
    (and the Keras backend is TensorFlow's, the default)."""
    from algpt2_tf.export.litert_engine import cached_build  # deferred: imports NumPy

    if args.engine == "xla":
        return None
    if args.engine == "auto":
        if _backend_chosen(args) != "tensorflow":
            return None
        return cached_build(args.model, args.quantize, build=False)
    build = cached_build(args.model, args.quantize, build=False)
    if build is None:
        # Deferred: the command's own module (`--help` stays fast).
        from algpt2_tf.runtime.tf_startup import import_tensorflow_quietly

        import_tensorflow_quietly()
        build = cached_build(args.model, args.quantize,
                             log=lambda line: print(line, file=sys.stderr))
    return build


def _write_stream(prompt, tokens, tokenizer, stop_ids):
    """Prints the prompt, then each new piece of text as its tokens arrive (a stop id
    ends it; a half multi-byte character waits for the rest)."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    new, shown = [], ""
    for token in tokens:
        if token in stop_ids:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(new)[len(shown):] + "\n")


def _prompt_text(prompt):
    """`--prompt` as text: `-` reads stdin; either must be valid UTF-8."""
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"The prompt on stdin is not valid UTF-8 (byte {e.start}: "
                             f"{data[e.start:e.start + 4]!r}).") from None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as surrogates
        raise UsageError(f"--prompt is not valid UTF-8 (character {e.start}).") from None
    return prompt


def _add_generation_commands(sub):
    from algpt2_tf.export.formats import ENGINE_QUANTIZATIONS  # deferred: imports NumPy

    p = sub.add_parser("generate", help="generate text, streaming it to the terminal")
    p.add_argument("--model", required=True, help="model.keras or a run directory")
    p.add_argument("--prompt", required=True, help="the prompt text, or - to read stdin")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sampler", default="top_p", help="greedy, sample, top_k or top_p")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop-id", type=int, action="append", help="extra stop token id (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["auto", "xla", "litert"], default="auto",
                   help="litert: a cached LiteRT build, made on first use (no TensorFlow at run "
                        "time after that); xla: the Keras model; auto: litert when its build is "
                        "cached and current, else xla")
    p.add_argument("--quantize", choices=ENGINE_QUANTIZATIONS, default="none",
                   help="the LiteRT build's weights (none: float32, the XLA path's greedy text)")
    p.set_defaults(func=_generate)


# -------------------------------------------------------------------- export
def _needs_tensorflow(what):
    from algpt2_tf.runtime import backend  # deferred: imports Keras, NumPy

    if not backend.is_tensorflow():
        raise UsageError(f"{what} needs the TensorFlow backend (this run uses "
                         f"{backend.name()}): run it with --backend tensorflow.")


def _export(args):
    from algpt2_tf.export import export_model  # deferred: imports NumPy

    _needs_tensorflow("export")
    report = export_model(args.model, args.format, args.out, version=args.version,
                          quantize=args.quantize, max_length=args.max_length,
                          overwrite=args.overwrite, batch=args.batch)
    print(report.summary())


def _add_export_command(sub):
    from algpt2_tf.export.formats import FORMATS, QUANTIZATIONS  # deferred: imports NumPy

    p = sub.add_parser("export", help="export .keras, a TF Serving SavedModel or TFLite")
    p.add_argument("--model", required=True, help="model.keras or a run directory")
    p.add_argument("--format", required=True, help=", ".join(FORMATS))
    p.add_argument("--out", required=True, help="model folder, e.g. saved_models/algpt2")
    p.add_argument("--version", type=int, help="version number (default: the next one)")
    p.add_argument("--quantize", default="none",
                   help=f"{', '.join(QUANTIZATIONS)}: fp16 and int4 for tflite only; int8 is "
                        "TFLite's int8 for tflite, Keras' weight-only int8 for keras and "
                        "savedmodel")
    p.add_argument("--max-length", type=int,
                   help="cache length for generate/decode (default: min(256, max_positions))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--batch", type=int, default=1,
                   help="tflite: the most rows its steps decode together (default 1)")
    p.set_defaults(func=_export)


# ------------------------------------------------------------------- convert
def _convert(args):

    from algpt2_tf import convert  # deferred: imports Keras, NumPy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", convert.ConversionWarning)
        if args.from_hf:
            report = convert.import_hf(args.from_hf, args.out)
        else:
            report = convert.export_hf(args.to_hf, args.out)
    for warning in caught:
        print(f"algpt2 convert: warning: {warning.message}", file=sys.stderr)
    print(report.summary())


def _add_convert_command(sub):
    p = sub.add_parser("convert", help="import a Hugging Face GPT-2, or export ours as one")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR",
                        help="a Hugging Face GPT-2 folder (config.json + model.safetensors)")
    source.add_argument("--to-hf", metavar="MODEL", help="our model.keras or a run directory")
    p.add_argument("--out", required=True,
                   help="the new folder: a run directory (--from-hf) or a Hugging Face folder "
                        "(--to-hf)")
    p.set_defaults(func=_convert)


# ------------------------------------------------------------------ compress
def _compress(args):
    from algpt2_tf.training.compression import compress_to_run  # deferred: imports NumPy

    overrides = None
    if args.overrides:
        try:
            overrides = json.loads(args.overrides)
        except json.JSONDecodeError as e:
            raise UsageError(f"--overrides is not valid JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise UsageError("--overrides must be a JSON object of config fields.")
    texts = _texts(args.eval_files, "The --eval-files hold no text.") if args.eval_files else None
    report = compress_to_run(args.teacher, args.out, preset=args.preset, overrides=overrides,
                             init=args.init, lora_rank=args.lora_rank, eval_texts=texts,
                             seq_len=args.seq_len, log=lambda line: print(line, file=sys.stderr))
    print(report.summary())


def _add_compress_command(sub):
    from algpt2_tf.training.compression import INITS  # deferred: imports NumPy

    p = sub.add_parser("compress", help="initialize an ALGPT2 from a trained GPT-2 (then train "
                       "it with --init-model and --teacher)")
    p.add_argument("--teacher", required=True, help="the trained model (model.keras or a run)")
    p.add_argument("--preset", default="algpt2",
                   help="the sharing to take from a preset (E, groups, ...); the shape is the "
                        "teacher's")
    p.add_argument("--overrides", help='config fields as JSON, e.g. \'{"num_layer_groups": 2}\'')
    p.add_argument("--init", default="average", choices=INITS,
                   help="a shared block starts from the mean of its layers or the first")
    p.add_argument("--lora-rank", type=int,
                   help="per-layer low-rank deltas from the SVD of (layer - shared block)")
    p.add_argument("--eval-files", nargs="+", help="held-out text: report the perplexity of "
                   "the teacher, the student and a random-init student")
    p.add_argument("--seq-len", type=int, default=128, help="evaluation window")
    p.add_argument("--out", required=True, help="the new run folder")
    p.set_defaults(func=_compress)


# --------------------------------------------------------------------- serve
def _xla_serving_settings(what):
    """A server on TensorFlow: the compiled-program cache (`xla_cache.use`, before TensorFlow
    reads its flags), TensorFlow imported quietly, the decode tricks and their process
    setting; `(tricks, compile_cache)`. The LiteRT engine needs none of it."""
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.runtime.tf_startup import import_tensorflow_quietly

    compile_cache = xla_cache.use()
    import_tensorflow_quietly()
    tricks = _decode_process_settings()
    _needs_tensorflow(what)
    return tricks, compile_cache


def _serve(args):
    if (args.model is None) == (args.model_base_path is None):
        raise UsageError("serve needs --model MODEL (the OpenAI-compatible API) or "
                         "--model-base-path and --model-name (TF Serving's protocol), not both.")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}.")
    for flag, value in (("--timeout", args.timeout), ("--poll-seconds", args.poll_seconds),
                        ("--max-request-bytes", args.max_request_bytes),
                        ("--max-response-bytes", args.max_response_bytes)):
        if not value > 0:  # NaN too
            raise UsageError(f"{flag} must be > 0, got {value}.")
    limits = dict(host=args.host, api_key=args.api_key or os.environ.get("ALGPT2_API_KEY"),
                  max_request_bytes=args.max_request_bytes,
                  max_response_bytes=args.max_response_bytes,
                  insecure_no_auth=args.insecure_no_auth)
    if args.model is not None:
        # Deferred: imports FastAPI, NumPy (TensorFlow only for the xla engine, below).
        from algpt2_tf.serving.openai_api import choose_engine, serve

        if args.max_batch < 1 or not args.batch_window_ms >= 0 or args.max_queue < 1:
            raise UsageError("--max-batch and --max-queue must be >= 1 and --batch-window-ms "
                             ">= 0.")
        if args.quantize != "none" and args.engine == "xla":
            raise UsageError("--quantize applies to --engine litert.")
        engine = choose_engine(args.engine, args.model, args.quantize, args.max_batch,
                               not args.no_batching)
        tricks, compile_cache = _xla_serving_settings("serve") if engine == "xla" else (None,
                                                                                         None)
        serve(args.model, port=args.port or 8000, model_name=args.model_name,
              max_batch=args.max_batch, window_s=args.batch_window_ms / 1000,
              max_queue=args.max_queue, batching=not args.no_batching, timeout_s=args.timeout,
              warm_up=not args.no_warm_up, engine=engine, quantize=args.quantize,
              tricks=tricks, compile_cache=compile_cache, **limits)
        return
    if args.model_name is None:
        raise UsageError("--model-base-path needs --model-name.")
    _xla_serving_settings("serve (SavedModels)")
    # Deferred: imports TensorFlow, tensorflow-text, FastAPI, orjson, NumPy.
    from algpt2_tf.serving.server import serve

    serve(args.model_base_path, args.model_name, port=args.port or 8501,
          timeout_seconds=args.timeout, poll_seconds=args.poll_seconds, **limits)


def _client(args):
    import numpy as np  # deferred: imports NumPy

    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.serving.client import ServingClient, ServingClientError

    client = ServingClient(args.url, args.model_name, args.version, timeout=args.timeout)
    try:
        if args.prompt is not None:
            out = client.generate([args.prompt], args.max_new_tokens, args.temperature,
                                  args.top_k, args.top_p, args.seed)
            print(out["text"][0])
        elif args.ids is not None:
            try:
                ids = [int(t) for t in args.ids.split(",")]
            except ValueError:
                raise UsageError(f"--ids must be comma-separated integers, got {args.ids!r}.")
            logits = np.asarray(client.logits([ids]))
            top = np.argsort(-logits[0, -1])[:5]
            print(json.dumps({"shape": list(logits.shape), "next_token_top5": top.tolist()}))
        else:
            print(json.dumps(client.status(), indent=2))
    except (ServingClientError, OSError) as e:
        print(f"algpt2 client: {e}", file=sys.stderr)
        return 1


def _add_serving_commands(sub):
    from algpt2_tf.export.formats import ENGINE_QUANTIZATIONS  # deferred: imports NumPy

    p = sub.add_parser("serve", help="serve a model over the OpenAI completions API (--model) "
                                      "or SavedModels over TF Serving's REST protocol")
    p.add_argument("--model", help="run folder, .keras file, HF folder or preset: the "
                                   "OpenAI-compatible API at /v1 (default port 8000)")
    p.add_argument("--model-base-path", help="SavedModel versions, e.g. saved_models/algpt2: "
                                             "TF Serving's protocol (default port 8501)")
    p.add_argument("--model-name", help="the served name (default for --model: its folder name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="anything but loopback needs --api-key (or --insecure-no-auth)")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request "
                                     "(default: $ALGPT2_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a --host beyond loopback without a key (logged as a warning)")
    p.add_argument("--max-batch", type=int, default=16, help="requests per batch (--model)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests (--model)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--no-batching", action="store_true", help="run each request alone")
    p.add_argument("--engine", choices=["auto", "xla", "litert"], default="xla",
                   help="--model: xla (the Keras model, batched decode steps), litert (its "
                        "LiteRT build, made once and cached; one request at a time: fastest "
                        "at batch 1) or auto (litert when its build is cached and current and "
                        "the server runs one request at a time or the build is int8 or int4, "
                        "else xla)")
    p.add_argument("--quantize", choices=ENGINE_QUANTIZATIONS, default="none",
                   help="the LiteRT build's weights (--engine litert or auto)")
    p.add_argument("--no-warm-up", action="store_true",
                   help="start without compiling the first batch shapes (--model; the first "
                        "requests then wait for the compiles)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--max-response-bytes", type=int, default=32 << 20,
                   help="the largest answer a request may ask for, checked before computing")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per request, reading its body included")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="how often to look for new versions")
    p.set_defaults(func=_serve)

    p = sub.add_parser("client", help="query a TF Serving REST endpoint (ours or the real one)")
    p.add_argument("--url", default="http://127.0.0.1:8501")
    p.add_argument("--model-name", required=True)
    p.add_argument("--version", type=int)
    p.add_argument("--prompt", help="generate from this text (the generate signature)")
    p.add_argument("--ids", help="comma-separated token ids: print next-token logits info")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=_client)


def _add_training_commands(sub):
    # Deferred: imports NumPy.
    from algpt2_tf.training.options import (DEFAULT_STEPS, OPTIMIZERS, SCHEDULES, TrainOptions,
                                            default_values)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a new byte-level BPE on your files")
    t.add_argument("--files", nargs="+", required=True, help="globs of .txt/.jsonl files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(func=_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize files once and cache the ids for training")
    p.add_argument("--files", nargs="+", required=True, help="globs of .txt/.jsonl files")
    p.add_argument("--out", help="cache directory (default: the one `train` looks in)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: GPT-2)")
    p.add_argument("--valid-fraction", type=float, default=0.0)
    p.add_argument("--text-key", default="text", help="the text field of .jsonl records")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train a model with model.fit (resumes when rerun)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=argparse.SUPPRESS,
                   help=f"model preset (without --config: {TrainOptions.preset})")
    p.add_argument("--config", help="model config JSON file instead of a preset")
    p.add_argument("--train-files", nargs="+", help="globs of .txt/.jsonl files "
                   "(default: a small built-in corpus of Python's documentation)")
    p.add_argument("--valid-files", nargs="+")
    p.add_argument("--valid-fraction", type=float, help="share of the training text held out")
    p.add_argument("--tokenizer", help="tokenizer directory (default: GPT-2)")
    p.add_argument("--cache-dir", help="token cache directory (see `algpt2 prepare`)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--seq-len", type=int, help="tokens per example")
    p.add_argument("--batch-size", type=int, help="examples per step")
    p.add_argument("--steps", type=int, help=f"(default: {DEFAULT_STEPS} without --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the data, instead of --steps")
    p.add_argument("--learning-rate", type=float, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, help="linear warmup from 0")
    p.add_argument("--schedule", help=", ".join(SCHEDULES))
    p.add_argument("--min-lr-ratio", type=float, help="the final learning rate / the peak")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay")
    p.add_argument("--optimizer", help=", ".join(OPTIMIZERS))
    p.add_argument("--clip-norm", type=float, help="global gradient-norm clipping")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--mixed-precision", choices=["bf16", "fp16"])
    p.add_argument("--jit-compile", action="store_true")
    p.add_argument("--fuse-elementwise", action="store_true",
                   help="XLA-fuse the element-wise ops, matmuls stay oneDNN (bf16 on CPU)")
    p.add_argument("--sop", action="store_true", help="train with sentence-order prediction")
    p.add_argument("--seed", type=int, help="initialization and data order")
    p.add_argument("--init-model", help="start from this model's weights and config (e.g. "
                   "`algpt2 compress`'s output) instead of --preset/--config")
    p.add_argument("--teacher", help="distill from this model (same vocabulary): adds "
                   "--distill-weight x KL(teacher || student) to the loss")
    p.add_argument("--distill-weight", type=float, help="weight of the distillation term")
    p.add_argument("--distill-temperature", type=float, help="softmax temperature T (the "
                   "term is scaled by T^2)")
    p.add_argument("--teacher-precision", choices=["float32", "bf16"],
                   help="how the teacher computes")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept")
    p.add_argument("--log-every", type=int, help="steps between metrics.csv rows")
    p.add_argument("--verbose", type=int, help="Keras progress: 0 silent, 1 bar, 2 lines")
    p.add_argument("--distribute", help="none; mirrored: data parallel over this host's "
                   "devices (TensorFlow); jax-data-parallel: over the devices of every process "
                   "(--backend jax; see `algpt2 launch`). --batch-size stays the global batch")
    p.add_argument("--replicas", type=int, help="mirrored: how many GPUs, or with no GPU how "
                   "many logical devices to split the CPU into")
    p.add_argument("--coordinator", help="jax-data-parallel: HOST:PORT of process 0, where the "
                   "processes meet (default: $ALGPT2_COORDINATOR)")
    p.add_argument("--num-processes", type=int,
                   help="jax-data-parallel: how many processes (default: $ALGPT2_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int,
                   help="jax-data-parallel: this process, 0 (the chief) to N-1 "
                   "(default: $ALGPT2_PROCESS_ID)")
    p.add_argument("--connect-timeout", type=float, help="jax-data-parallel: seconds to wait "
                   "for the other processes before failing (default 300)")
    # Every default comes from TrainOptions; --preset's applies only without --config (_train).
    p.set_defaults(**{k: v for k, v in default_values().items() if k != "preset"})
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="perplexity, bits per byte and word perplexity")
    p.add_argument("--model", required=True, help="model.keras or a run directory")
    p.add_argument("--files", nargs="+", required=True)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate)


# ---------------------------------------------------------------- experiments
def _experiment_run(args):
    from algpt2_tf.experiments.runner import run_experiment  # deferred: imports Keras, NumPy

    run_experiment(args.spec, args.out, verbose=args.verbose)


def _experiment_report(args):
    from algpt2_tf.experiments.report import copy_report, write_report  # deferred: imports NumPy

    write_report(args.dir)
    if args.copy_to:
        print(f"Report files copied to {copy_report(args.dir, args.copy_to)}")


def _experiment_scaling(args):
    from algpt2_tf.experiments.scaling import write_scaling_report  # deferred: imports NumPy

    write_scaling_report(args.dir, args.baseline, dest=args.out)


def _experiment_quality(args):
    from algpt2_tf.experiments.quality import judge_experiment  # deferred: imports NumPy

    judge_experiment(args.dir, args.spec, args.judges, dest=args.out, baseline=args.baseline,
                     equal_on=args.equal_on)


def _add_experiment_commands(sub):
    p = sub.add_parser("experiment", help="train, evaluate and compare model variants (arms)")
    esub = p.add_subparsers(dest="experiment_command", required=True)
    r = esub.add_parser("run", help="run every arm of a spec that has no result yet, then report")
    r.add_argument("spec", help="the spec, a .json or .yaml file")
    r.add_argument("--out", required=True, help="experiment folder, e.g. experiments/runs/NAME")
    r.add_argument("--verbose", type=int, default=1, help="Keras progress: 0 silent, 1 bar, 2 lines")
    r.set_defaults(func=_experiment_run)
    r = esub.add_parser("report", help="rewrite the table, CSV, JSON and plots from the folder")
    r.add_argument("dir", help="an experiment folder")
    r.add_argument("--copy-to", help="also copy the report files (not the runs) here, e.g. "
                   "experiments/results/NAME")
    r.set_defaults(func=_experiment_report)
    r = esub.add_parser("scaling", help="ratio to a baseline family against training tokens "
                                        "(arms named FAMILY_<N>x), with fitted trends")
    r.add_argument("dir", help="an experiment folder")
    r.add_argument("--baseline", required=True, help="the family the ratios divide by")
    r.add_argument("--out", help="where scaling.md/.json and the plot go (default: DIR)")
    r.set_defaults(func=_experiment_scaling)
    r = esub.add_parser("quality", help="judge every run's samples with trained models "
                                        "(generative perplexity at equal held-out perplexity)")
    r.add_argument("dir", help="an experiment folder")
    r.add_argument("--spec", required=True, help="the spec the folder ran")
    r.add_argument("--judges", nargs="+", required=True, help="arms whose models judge")
    r.add_argument("--baseline", help="a family (arms FAMILY_<N>x) to compare every other "
                   "family with at equal own perplexity")
    r.add_argument("--equal-on", help="the held-out set whose own perplexity is that "
                   "comparison's axis for every set's samples (default: each set's own)")
    r.add_argument("--out", help="where quality.md/.json and the plot go (default: DIR)")
    r.set_defaults(func=_experiment_quality)


# ---------------------------------------------------------------------- launch
def _launch(args):
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.training.launch import launch_local

    command = args.algpt2_args[1:] if args.algpt2_args[:1] == ["--"] else args.algpt2_args
    if not command:
        raise UsageError("Give the command after --, e.g. `algpt2 launch --nproc 2 -- train "
                         "--distribute jax-data-parallel ...`.")
    try:
        inner = build_parser().parse_args(command)
    except SystemExit:
        raise UsageError(f"The command after -- is not a valid algpt2 command: "
                         f"{' '.join(command)}") from None
    if inner.command != "train" or inner.distribute != "jax-data-parallel":
        raise UsageError("algpt2 launch runs `train --distribute jax-data-parallel` (each process "
                         "trains its part of one run); other commands would run N times alone.")
    if inner.backend not in (None, "jax"):
        raise UsageError(f"--distribute jax-data-parallel needs --backend jax, got "
                         f"--backend {inner.backend}.")
    return launch_local(command, args.nproc, port=args.port)


def _add_launch_command(sub):
    p = sub.add_parser("launch", help="run one data-parallel training as N local processes "
                       "(JAX): algpt2 launch --nproc 2 -- train --distribute jax-data-parallel ...")
    p.add_argument("--nproc", type=int, required=True, help="how many processes")
    p.add_argument("--port", type=int, help="the coordinator's port on localhost "
                   "(default: a free one)")
    p.add_argument("algpt2_args", nargs=argparse.REMAINDER,
                   help="-- then the algpt2 command every process runs")
    p.set_defaults(func=_launch)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="algpt2", description="ALGPT2: an ALBERT-style GPT-2 for TensorFlow / Keras 3.")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="the Keras backend: train, evaluate and generate run on each; "
                             "export and serve need tensorflow (default: $KERAS_BACKEND, "
                             "else tensorflow)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print presets and their parameter counts")
    p.add_argument("--preset", help="print one preset's full config and parameter count")
    p.set_defaults(func=_info)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS = [_add_training_commands, _add_experiment_commands, _add_generation_commands,
                   _add_export_command, _add_convert_command, _add_compress_command,
                   _add_serving_commands, _add_launch_command]


BACKENDS = ("tensorflow", "torch", "jax")


def _choose_backend(name):
    """Sets KERAS_BACKEND before Keras starts (the `algpt2` script imports it late)."""
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != name:
        raise UsageError(f"--backend {name}: Keras already started with "
                         f"{keras.backend.backend()}; use the `algpt2` command or set "
                         f"KERAS_BACKEND={name} before Python starts.")
    os.environ["KERAS_BACKEND"] = name


def _decode_process_settings():
    """The decode tricks of this command (`ALGPT2_DECODE_TRICKS` over the CPU's defaults,
    read once here and passed to the code they change), with their process setting applied
    before anything compiles: 512-bit vector code on AVX-512 CPUs (`wide_vectors`; the
    user's own XLA_FLAGS choice wins)."""
    # Deferred: imports TensorFlow, Keras, NumPy.
    from algpt2_tf.generation.decode_tricks import DecodeTricks
    # Deferred: the command's own module (`--help` stays fast).
    from algpt2_tf.runtime.xla_flags import prefer_wide_vectors

    try:
        tricks = DecodeTricks.from_environment()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if tricks.wide_vectors:
        prefer_wide_vectors()
    return tricks


def _backend_chosen(args):
    """The Keras backend this run uses: `--backend`, else `$KERAS_BACKEND`, else TensorFlow."""
    return args.backend or os.environ.get("KERAS_BACKEND", "tensorflow")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # process settings, before anything imports Keras or compiles
        if args.backend:
            _choose_backend(args.backend)
    except UsageError as e:
        print(f"algpt2: error: {e}", file=sys.stderr)
        return 2
    # info: the presets alone; generate and serve: TensorFlow only for the engine that needs it;
    # evaluate: only on TensorFlow's backend.
    if args.command not in ("info", "launch", "generate", "serve") and not (
            args.command == "evaluate" and _backend_chosen(args) != "tensorflow"):
        # Deferred: the command's own module (`--help` stays fast).
        from algpt2_tf.runtime.tf_startup import import_tensorflow_quietly

        import_tensorflow_quietly()
    try:
        result = args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError) as e:
        print(f"algpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
