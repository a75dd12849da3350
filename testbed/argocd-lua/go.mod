module idm-backup-operator/testbed/argocd-lua

go 1.26.0

// Argo CD's own versions (argo-cd v3.6.1 go.mod): the interpreter, and the JSON encoder that turns the
// script's table into its health.
require (
	github.com/yuin/gopher-lua v1.1.2
	layeh.com/gopher-json v0.0.0-20190114024228-97fed8db8427
)
