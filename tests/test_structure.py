"""The package's shape: no import cycle between its modules, and private
Keras/TensorFlow APIs used only in keras_kfac.compat."""

import ast
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_kfac")


def _modules():
    modules = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                modules[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return modules


def _imports(path, modules):
    """keras_kfac modules imported anywhere in the file (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("keras_kfac")
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is the package's
    # definition, not a dependency of those submodules on the package.
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph[m]):
            if dep.startswith(m + "."):
                continue
            if state.get(dep) == "open":
                raise AssertionError(
                    "import cycle: " + " -> ".join(stack[stack.index(dep) :] + [dep])
                )
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_private_apis_only_in_compat():
    private = re.compile(
        r"keras\.src|tensorflow\.python|tf\.__internal__|_flatten_layers|_setattr_hook"
        r"|_all_reduce_sum_gradients|_distributed_tf_update_step|_var_key\(|_get_on_device_or_primary"
        r"|currentframe|_backend_update_step|_apply_weight_decay|_get_variable_index"
        r"|_use_weight_decay|self\._variables\b"
    )
    offenders = []
    for module, path in _modules().items():
        if module == "keras_kfac.compat":
            continue
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if private.search(line.split("#")[0]):
                offenders.append(f"{module}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
