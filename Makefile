PY := .venv/bin/python

.PHONY: test toy setup clean

.venv/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: .venv/.installed

test: setup
	$(PY) -m pytest -q tests

toy: setup
	@echo "make toy arrives with the toy-world issue (issue 4); until then see README."
	@exit 1

clean:
	rm -rf .venv out
