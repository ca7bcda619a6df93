#!/usr/bin/env bash
# etcd 3.4 and kube-apiserver v1.20.2 for the chart and operator tests, from Debian bookworm's
# archive only (no registry ships kube-apiserver): etcd-server is a binary package; the
# apiserver is built from the `kubernetes` source package with Debian's golang-1.19.
# Nothing is installed system-wide: packages are unpacked under $OUT. About 7 minutes cold.
#   OUT=~/.cache/tandem-envtest bash scripts/k8s/bootstrap_envtest.sh   -> $OUT/bin/{etcd,kube-apiserver}
set -euo pipefail
OUT=${OUT:-$HOME/.cache/tandem-envtest}
if [ -x "$OUT/bin/kube-apiserver" ] && [ -x "$OUT/bin/etcd" ]; then exit 0; fi
echo "building etcd + kube-apiserver v1.20.2 into $OUT (once; about 7 minutes)" >&2
mkdir -p "$OUT"/{debs,root,src,apt/lists/partial,apt/cache/archives/partial,bin}
cd "$OUT"
started=$(date +%s)
apt-get update -qq
# 1. binaries, unpacked only: etcd, the Go toolchain, and reflect2 1.0.2 (the 1.0.1 that
#    kubernetes 1.20 vendors crashes under Go >= 1.18)
(cd debs && apt-get download -qq etcd-server golang-1.19-go golang-1.19-src \
    golang-github-modern-go-reflect2-dev)
for deb in debs/*.deb; do dpkg-deb -x "$deb" root; done
cp root/usr/bin/etcd bin/etcd
# 2. the kubernetes source package, through a private deb-src list (the system's apt
#    configuration is left alone), from the machine's own Debian mirror
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list)
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main" \
    > apt/src.list
apt_private=(-o Dir::Etc::sourcelist="$OUT/apt/src.list" -o Dir::Etc::sourceparts=-
             -o Dir::State::Lists="$OUT/apt/lists" -o Dir::Cache="$OUT/apt/cache")
apt-get "${apt_private[@]}" update -qq
(cd src && apt-get "${apt_private[@]}" source --download-only -qq \
    kubernetes=1.20.5+really1.20.2-1.1+deb12u1)
rm -rf gopath && mkdir -p gopath/src/k8s.io
tar xzf src/kubernetes_1.20.5+really1.20.2.orig.tar.gz -C gopath/src/k8s.io
mv gopath/src/k8s.io/kubernetes-1.20.2 gopath/src/k8s.io/kubernetes
K=$OUT/gopath/src/k8s.io/kubernetes
rm -rf "$K/vendor/github.com/modern-go/reflect2"
cp -a root/usr/share/gocode/src/github.com/modern-go/reflect2 "$K/vendor/github.com/modern-go/reflect2"
# 3. build in GOPATH mode, as 1.20 did; its generated OpenAPI file is not in the tarball, so
#    the vendored openapi-gen writes it first
export PATH=$OUT/root/usr/lib/go-1.19/bin:$PATH GO111MODULE=off GOPROXY=off GOFLAGS= \
    CGO_ENABLED=0 GOPATH=$OUT/gopath GOCACHE=$OUT/gocache
cd "$K"
go build -o "$OUT/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
dirs=$(find -H . -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) \
    -type f -name '*.go' | sed 's|^./staging/src|vendor|; s|/[^/]*$||; s|^./||' | LC_ALL=C sort -u)
inputs=$(for d in $dirs; do find "$d" -maxdepth 1 -type f -name '*.go'; done \
    | xargs grep -l '^// *+k8s:' \
    | grep -v -E '^vendor/k8s.io/(code-generator|sample-apiserver)/' \
    | xargs grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u \
    | sed 's|^|k8s.io/kubernetes/|' | paste -sd,)
"$OUT/bin/openapi-gen" -i "$inputs" -p k8s.io/kubernetes/pkg/generated/openapi \
    -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
    -r "$OUT/openapi-violations.report"
vendor=k8s.io/kubernetes/vendor/k8s.io
ldflags="-s -w"
for pkg in component-base/version client-go/pkg/version; do
    ldflags="$ldflags -X $vendor/$pkg.gitVersion=v1.20.2 -X $vendor/$pkg.gitMajor=1"
    ldflags="$ldflags -X $vendor/$pkg.gitMinor=20 -X $vendor/$pkg.gitTreeState=clean"
done
go build -p 2 -ldflags "$ldflags" -o "$OUT/bin/kube-apiserver.partial" ./cmd/kube-apiserver
mv "$OUT/bin/kube-apiserver.partial" "$OUT/bin/kube-apiserver"
# keep the binaries only (the source tree, toolchain and caches are 2 GB)
rm -rf "$OUT/gopath" "$OUT/gocache" "$OUT/root" "$OUT/src" "$OUT/debs" "$OUT/apt"
"$OUT/bin/kube-apiserver" --version >&2
echo "envtest ready in $(( $(date +%s) - started )) s: $OUT/bin" >&2
