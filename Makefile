# The two commands of the README:  `make demo`  and  `make test`.
PYTHON ?= python3
PYTEST_WORKERS ?= 2
# text files and subprocess output are UTF-8 whatever the machine's locale (CI may have none)
export PYTHONUTF8 := 1

.PHONY: install demo test

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. A torch that is already
# installed (for example a CUDA build you chose) is kept.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) -m dira3d.demo

test: install
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests
