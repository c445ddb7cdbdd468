# make demo   create .venv, build the synthetic dataset, train + ensemble-test CxGrad on the CPU
# make test   create .venv and run the tests
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The real Omniglot zips for the end-to-end test: taken from ../shared/data/omniglot when present.
OMNIGLOT_ZIPS ?= $(if $(wildcard ../shared/data/omniglot/images_background.zip),$(abspath ../shared/data/omniglot),)
export OMNIGLOT_ZIPS

.PHONY: venv test demo clean-demo

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PYTHON) -m pytest

demo: venv
	$(PYTHON) preprocess/preprocess.py --datasets synthetic_glyphs
	$(PYTHON) train_maml_system.py --name_of_args_json_file experiment_config/synthetic_glyphs_5way_1shot/CxGrad_4conv_demo.yaml

clean-demo:
	rm -rf experiments/synthetic_glyphs_5way_1shot_CxGrad_4conv_demo
