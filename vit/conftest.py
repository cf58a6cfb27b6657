"""Make this folder's tests import this folder's modules, never another folder's.

Every folder of the repo has a model.py, a train.py and a sample.py. Python caches modules by name,
so once pytest has imported ddpm/'s tests, `import model` in gpt/ would hand back ddpm's model. Just
before pytest collects (imports) a test file of this folder, the hook below evicts any cached module
that shares a name with a file here but lives elsewhere, and puts this folder first on sys.path.
Sibling modules are therefore imported at the top of each file, at collection time, never lazily
inside a function. The same file sits in every folder; tests/test_structure.py checks that, and that
it works.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collectstart(collector):
    for filename in os.listdir(HERE):
        name, ext = os.path.splitext(filename)
        if ext != ".py" or name == "conftest" or name.startswith("test_"):
            continue
        module = sys.modules.get(name)
        path = getattr(module, "__file__", "") or ""
        if module is not None and os.path.dirname(os.path.abspath(path)) != HERE:
            del sys.modules[name]
    if sys.path[0] != HERE:
        sys.path.insert(0, HERE)
