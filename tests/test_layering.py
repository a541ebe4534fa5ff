"""The layers of the repository, read from the source with `ast`: the library (nclib/) beneath the entry
scripts, no circle of imports inside it, one owner for ranks (nclib/distributed.py) and for CUDA graphs
(nclib/steps.py), and nclib/base.py at the bottom, importing nothing of the project."""
import ast
import glob
import os


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_SCRIPTS = {"train_1st_order", "train_2nd_order", "validate_NC", "experiments", "ufm", "claims", "utils"} | \
    {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "plot_*.py"))}
PROJECT = ENTRY_SCRIPTS | {"nclib", "args", "datasets", "models"}


def sources():
    """{path relative to the repository: its syntax tree} of every .py file in the repository."""
    trees = {}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "model_weights", "data")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    trees[os.path.relpath(path, REPO)] = ast.parse(f.read(), path)
    return trees


TREES = sources()


def imported(path):
    """The modules a file imports anywhere in it (at the top or inside a function), as dotted names;
    `from package import name` counts as package.name too."""
    names = set()
    package = os.path.dirname(path).replace(os.sep, ".")
    for node in ast.walk(TREES[path]):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def library():
    return sorted(p for p in TREES if p.startswith("nclib" + os.sep))


def module_name(path):
    return path[:-3].replace(os.sep, ".").removesuffix(".__init__")


def test_every_library_module_is_found():
    names = {module_name(p) for p in library()}
    assert {"nclib.base", "nclib.distributed", "nclib.steps", "nclib.nc", "nclib.losses", "nclib.training"} <= names


def test_no_import_cycle_among_the_library_modules():
    modules = {module_name(p): p for p in library() if not p.endswith("__init__.py")}
    graph = {m: sorted(n for n in imported(p) if n in modules and n != m) for m, p in modules.items()}
    state = {}

    def visit(m, trail):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(trail[trail.index(m):] + [m])
        state[m] = "open"
        for n in graph[m]:
            visit(n, trail + [m])
        state[m] = "done"
    for m in graph:
        visit(m, [])


def test_no_library_module_imports_an_entry_script_or_utils():
    beneath = library() + [p for p in TREES if p in ("args.py", "datasets.py") or p.startswith("models" + os.sep)]
    wrong = {p: sorted(n for n in imported(p) if n.split(".")[0] in ENTRY_SCRIPTS) for p in beneath}
    assert {p: n for p, n in wrong.items() if n} == {}


def uses(tree, dotted):
    """Whether the tree imports `dotted` (a.b.c) or names it as an attribute chain (a.b.c, a.b.c.x)."""
    head, last = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == dotted or a.name.startswith(dotted + ".") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == dotted or node.module.startswith(dotted + ".")
                or (node.module == head and any(a.name == last for a in node.names))):
            return True
        if isinstance(node, ast.Attribute) and node.attr == last and ast.unparse(node.value) == head:
            return True
    return False


def test_torch_distributed_is_imported_only_by_nclib_distributed():
    users = sorted(p for p, tree in TREES.items() if uses(tree, "torch.distributed"))
    assert users == [os.path.join("nclib", "distributed.py")]  # tests and benchmarks included


def test_cuda_graphs_appear_only_in_nclib_steps():
    def graphs(tree):
        return uses(tree, "torch.cuda.graph") or uses(tree, "torch.cuda.CUDAGraph") or any(
            isinstance(n, ast.Name) and n.id == "CUDAGraph" or isinstance(n, ast.alias) and n.name == "CUDAGraph"
            for n in ast.walk(tree))
    users = sorted(p for p, tree in TREES.items() if graphs(tree))
    assert users == [os.path.join("nclib", "steps.py")]  # tests and benchmarks included


def test_nclib_base_imports_nothing_of_the_project():
    assert sorted(n for n in imported(os.path.join("nclib", "base.py")) if n.split(".")[0] in PROJECT) == []
