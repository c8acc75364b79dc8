# Convenience wrappers. The plain route works too:
#   ./install-deps.sh && cmake -S . -B build && cmake --build build
# `make run`  installs dependencies, builds, and starts the service against the
#             bundled controller simulator (demo mode).
# `make test` installs dependencies, builds, and runs every test suite: the
#             normal build, the ASan+UBSan build, the fuzz-corpus replays, the
#             Release build (gcc -O3, -Werror, unit tests), then the format check.
# `make build-matrix` builds Debug, Release and RelWithDebInfo with gcc and
#             clang, tests included, each with -Werror (not part of `make test`).
# On a machine without make, run ./install-deps.sh first (the README does).
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
RELEASE_BUILD ?= build-release
JOBS       ?= $(shell nproc)

.PHONY: deps build run test test-fast test-asan test-fuzz test-release build-matrix fuzz format format-check bench clean

deps:
	./install-deps.sh

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(BUILD) -j$(JOBS)

run: build
	./test/sim/demo.sh $(BUILD)

test-fast: build
	cd $(BUILD) && ctest --output-on-failure -j2 -E 'integ/test_container'

# Every suite under ASan+UBSan but the integration suites' second run on
# PostgreSQL and the soak (the normal build runs those): the PostgreSQL
# backend stays covered here by its unit suites, test_replicas and
# test_pg_tls, at half the time.
test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DZM_SANITIZE=ON
	cmake --build $(ASAN_BUILD) -j$(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure -j2 -E 'integ/test_container|bench/|^integ-pg/|^soak/'

# libFuzzer drivers (clang) replaying every committed seed and regression input.
test-fuzz: deps
	CC=clang cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=Debug -DZM_FUZZ=ON -DZM_SANITIZE=ON
	cmake --build $(FUZZ_BUILD) -j$(JOBS) --target $$(cd test/fuzz && ls fuzz_*.c | sed 's/\.c$$//')
	cd $(FUZZ_BUILD) && ctest --output-on-failure -R '^fuzz/'

# Optimised build: gcc -O3 finds warnings (-Wmaybe-uninitialized...) that the
# RelWithDebInfo build does not. Unit tests only: the integration suites ran
# against the normal build already.
test-release: deps
	CC=gcc cmake -S . -B $(RELEASE_BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(RELEASE_BUILD) -j$(JOBS)
	cd $(RELEASE_BUILD) && ctest --output-on-failure -j2 -R '^unit/|^bench/(hist|scenario)_test'

build-matrix: deps
	@set -e; mkdir -p build-matrix; for cc in gcc clang; do for bt in Debug Release RelWithDebInfo; do \
	  echo "== $$cc $$bt"; log=build-matrix/$$cc-$$bt.log; \
	  CC=$$cc cmake -S . -B build-matrix/$$cc-$$bt -DCMAKE_BUILD_TYPE=$$bt >$$log 2>&1 && \
	  cmake --build build-matrix/$$cc-$$bt -j$(JOBS) >>$$log 2>&1 || \
	    { grep -E 'warning|[Ee]rror' $$log; exit 1; }; \
	  if grep -E 'warning:|CMake Warning' $$log; then exit 1; fi; \
	done; done; echo "build-matrix: 6 builds, no warnings"

# Without git (a fresh container, a tarball) the four source folders are
# listed instead; an empty list is an error, not a clean result.
format-check:
	@files=$$(git ls-files '*.c' '*.h' 2>/dev/null || find bench include src test -name '*.c' -o -name '*.h'); \
	[ -n "$$files" ] || { echo "format-check: no C files found"; exit 1; }; \
	clang-format --dry-run --Werror $$files && echo "clang-format: clean (`echo $$files | wc -w` files)"

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

test: test-fast test-asan test-fuzz test-release format-check

bench:
	./bench/run.sh

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD) $(RELEASE_BUILD) build-matrix
