# One release build, static, for the gnu target: the binaries, the images,
# the unit tests and the end-to-end tests all share it.
TARGET      ?= x86_64-unknown-linux-gnu
export RUSTFLAGS = -C target-feature=+crt-static
CARGO_FLAGS  = --release --target $(TARGET) --workspace
BIN_DIR      = target/$(TARGET)/release
WORKERS      = http-import
IMAGE_REPO  ?= localhost/populator
IMAGE_TAG   ?= dev
export POPULATOR_BIN_DIR = $(CURDIR)/$(BIN_DIR)

.PHONY: build static images test unit-test e2e-test demo bench lint fmt deps clean

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

bench: static
	scripts/bench.sh $(BIN_DIR)

lint:
	cargo fmt --all -- --check
	cargo clippy $(CARGO_FLAGS) --all-targets -- -D warnings

fmt:
	cargo fmt --all

deps:
	scripts/install-test-deps.sh

clean:
	cargo clean
