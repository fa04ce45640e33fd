"""The package's import graph: dependencies point one way.

Module-level imports between `algpt2_tf` modules form no cycle; the model core (`config`,
`layers/`, `model`) imports nothing of generation, training, conversion, export or serving,
at module level or in a function; and an import inside a function that closes a cycle (a hidden one: the module it imports
leads back to the importer, through any imports) fails here: the backbone/task split
(`model.ALGPT2Backbone`, `causal_lm.ALGPT2LMHeadModel`) removed the last of them.
"""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algpt2_tf")

CORE = {"algpt2_tf.config", "algpt2_tf.model", "algpt2_tf.layers"}
OUTSIDE_THE_CORE = ("algpt2_tf.causal_lm", "algpt2_tf.saving", "algpt2_tf.generation",
                    "algpt2_tf.training", "algpt2_tf.convert", "algpt2_tf.export",
                    "algpt2_tf.serving", "algpt2_tf.experiments", "algpt2_tf.cli")


def module_name(path):
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return relative.removesuffix(".__init__")


def modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield module_name(path), path


def imported(node, current, is_package):
    """The `algpt2_tf` modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("algpt2_tf")]
    if node.level:  # relative
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("algpt2_tf"):
        return []
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph():
    """`(module_level, in_functions)`: module -> the package modules it imports."""
    known = dict(modules())
    top, inner = {}, {}
    for name, path in known.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        is_package = path.endswith("__init__.py")
        top[name], inner[name] = set(), set()
        functions = [n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
        nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        # The root package (its __init__ imports lazily) and a module's own parent packages
        # are not dependencies of their own.
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = {t for t in imported(node, name, is_package) if t in known}
                (inner if id(node) in nested else top)[name].update(targets - {name} - parents)
    return top, inner


def reachable(graph, start):
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def in_package(module, package):
    return module == package or module.startswith(package + ".")


def test_module_level_imports_have_no_cycle():
    top, _ = import_graph()
    assert sorted(m for m in top if m in reachable(top, m)) == []


def test_the_model_core_imports_nothing_outside_it():
    top, inner = import_graph()
    every = {m: top[m] | inner[m] for m in top}
    core = [m for m in top if any(in_package(m, c) for c in CORE)]
    for module in core:
        outside = {t for t in reachable(every, module)
                   if any(in_package(t, o) for o in OUTSIDE_THE_CORE)}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_no_new_import_inside_a_function_hides_a_cycle():
    top, inner = import_graph()
    every = {m: top[m] | inner[m] for m in top}
    hidden = {(module, target) for module, targets in inner.items() for target in targets
              if module in reachable(every, target)}
    assert sorted(hidden) == []


def test_every_import_inside_a_function_says_what_it_defers():
    """An import inside a function is there to defer something heavy (TensorFlow, Keras, a
    command's own modules): a comment on its line, or the line above, says what."""
    silent = []
    for name, path in modules():
        source = open(path, encoding="utf-8").read()
        lines = source.splitlines()
        functions = [n for n in ast.walk(ast.parse(source))
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in {id(n): n for f in functions for n in ast.walk(f)
                     if isinstance(n, (ast.Import, ast.ImportFrom))}.values():
            said = lines[node.lineno - 1:node.end_lineno] + lines[node.lineno - 2:node.lineno - 1]
            if not any("#" in line for line in said):
                silent.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert silent == []
