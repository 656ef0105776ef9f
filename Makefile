# One release build, static, for the gnu target: the binaries, the images,
# the unit tests and the end-to-end tests all share it.
TARGET      ?= x86_64-unknown-linux-gnu
export RUSTFLAGS = -C target-feature=+crt-static
CARGO_FLAGS  = --release --target $(TARGET) --workspace
BIN_DIR      = target/$(TARGET)/release
# One binary and one image per crate under workers/ (core is the library).
WORKERS      = $(filter-out core,$(notdir $(wildcard workers/*)))
# One script per benchmark: scripts/bench-NAME.sh BIN_DIR (make bench-NAME).
BENCHES      = $(patsubst scripts/bench-%.sh,%,$(wildcard scripts/bench-*.sh))
IMAGE_REPO  ?= localhost/populator
IMAGE_TAG   ?= dev
export POPULATOR_BIN_DIR = $(CURDIR)/$(BIN_DIR)

.PHONY: build static images test demo bench lint fmt fmt-check deps clean fuzz

build static:
	cargo build $(CARGO_FLAGS)
	@for w in $(WORKERS); do ls -l $(BIN_DIR)/$$w; done

images: static
	scripts/build-images.sh $(IMAGE_REPO) $(IMAGE_TAG) $(BIN_DIR) $(WORKERS)

# Every test: unit tests of each crate, then the end-to-end suite (root,
# loop devices, nginx, podman), all against the one build above.
test: deps images
	cargo test $(CARGO_FLAGS) -- --test-threads=2

demo: static
	scripts/demo.sh $(BIN_DIR)

# Every benchmark, side by side with the tool a user would run instead;
# figures go to bench-out/ and are summarised in docs/benchmarks.md.
bench: static
	set -e; for b in $(BENCHES); do scripts/bench-$$b.sh $(BIN_DIR); done

bench-%: static
	scripts/bench-$*.sh $(BIN_DIR)

fmt-check:
	cargo fmt --all -- --check

lint: fmt-check
	cargo clippy $(CARGO_FLAGS) --all-targets -- -D warnings

fmt:
	cargo fmt --all

deps:
	scripts/install-test-deps.sh

clean:
	cargo clean

# Fuzzes each disk image parser for FUZZ_SECONDS (default 600) seconds
# (nightly Rust and cargo-fuzz; see docs/reliability.md).
fuzz:
	scripts/fuzz.sh
