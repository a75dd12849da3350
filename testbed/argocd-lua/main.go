// Command argocd-lua runs an Argo CD resource health check, a Lua script as set in argocd-cm under
// resource.customizations.health.<group>_<kind>, on one object, in the Lua environment that Argo CD's
// application controller gives such a script (argo-cd v3.6.1, util/lua), and prints the health that
// Argo CD would show.
//
//	argocd-lua [-use-open-libs] SCRIPT.lua OBJECT.json    (either path may be - for standard input)
//
// The environment, as Argo CD builds it:
//   - the same interpreter, github.com/yuin/gopher-lua at Argo CD's version (see go.mod);
//   - without resource.customizations.useOpenLibs.<group>_<kind>: true (the -use-open-libs flag), only the
//     package, base and table libraries, and a "safe" os with just time and date: there is no string,
//     math, io or full os library;
//   - the safe os as Argo CD installs it: its time and date functions are added to the table library's
//     table (Argo CD registers them under that name), there is no global os, and require("os") returns a
//     table with time and date;
//   - the global obj: the object as a table of tables, JSON numbers as Lua numbers, null as nil;
//   - a one-second limit on the script's run time.
//
// The script's value is then read the way Argo CD reads it: a table goes through layeh.com/gopher-json's
// encoder (the one Argo CD uses) into {status, message}; a status that is not one of Argo CD's health codes
// becomes Unknown with Argo CD's message, a table that encodes as a JSON array (an empty one) or with fields
// of the wrong type gives an empty health, and nil gives no health at all (printed as null). Anything else,
// and any Lua error, is an error: printed on standard error, with exit status 1.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
)

// Argo CD's health codes (gitops-engine pkg/health).
var healthCodes = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

// health is gitops-engine's HealthStatus, with the same JSON names.
type health struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

func main() {
	openLibs := flag.Bool("use-open-libs", false,
		"all of gopher-lua's standard libraries, as with resource.customizations.useOpenLibs.<group>_<kind>: true")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [-use-open-libs] SCRIPT.lua OBJECT.json\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 2 {
		flag.Usage()
		os.Exit(2)
	}
	script, err := read(flag.Arg(0))
	if err == nil {
		var object any
		if object, err = decodeObject(flag.Arg(1)); err == nil {
			var result *health
			if result, err = run(string(script), object, *openLibs); err == nil {
				out, _ := json.Marshal(result)
				fmt.Println(string(out))
				return
			}
		}
	}
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func read(path string) ([]byte, error) {
	if path == "-" {
		return io.ReadAll(os.Stdin)
	}
	return os.ReadFile(path)
}

// decodeObject reads the object as Kubernetes' unstructured decoding does: integers as int64, other
// numbers as float64.
func decodeObject(path string) (any, error) {
	data, err := read(path)
	if err != nil {
		return nil, err
	}
	decoder := json.NewDecoder(bytes.NewReader(data))
	decoder.UseNumber()
	var object any
	if err := decoder.Decode(&object); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if _, ok := object.(map[string]any); !ok {
		return nil, fmt.Errorf("%s: not a JSON object", path)
	}
	return numbers(object), nil
}

func numbers(value any) any {
	switch v := value.(type) {
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return i
		}
		f, _ := v.Float64()
		return f
	case []any:
		for i := range v {
			v[i] = numbers(v[i])
		}
	case map[string]any:
		for k := range v {
			v[k] = numbers(v[k])
		}
	}
	return value
}

// toLua converts a decoded JSON value into Lua values: objects become tables keyed by string, arrays
// tables appended to in order, numbers LNumber, and null (or anything else) nil.
func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case []any:
		table := l.CreateTable(len(v), 0)
		for _, item := range v {
			table.Append(toLua(l, item))
		}
		return table
	case map[string]any:
		table := l.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(l, item))
		}
		return table
	}
	return lua.LNil
}

// safeOs returns gopher-lua's own os.time and os.date, the two functions of Argo CD's safe os (which are
// copies of them).
func safeOs() map[string]lua.LGFunction {
	scratch := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer scratch.Close()
	scratch.Push(scratch.NewFunction(lua.OpenOs))
	scratch.Push(lua.LString(lua.OsLibName))
	scratch.Call(1, 1)
	module := scratch.Get(-1).(*lua.LTable)
	funcs := map[string]lua.LGFunction{}
	for _, name := range []string{"time", "date"} {
		funcs[name] = module.RawGetString(name).(*lua.LFunction).GFunction
	}
	return funcs
}

func newState(openLibs bool) *lua.LState {
	l := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	osFuncs := safeOs()
	openSafeOs := func(l *lua.LState) int {
		l.Push(l.RegisterModule(lua.TabLibName, osFuncs))
		return 1
	}
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, openSafeOs},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			panic(err)
		}
	}
	l.PreloadModule(lua.OsLibName, func(l *lua.LState) int {
		l.Push(l.SetFuncs(l.NewTable(), osFuncs))
		return 1
	})
	return l
}

func run(script string, object any, openLibs bool) (*health, error) {
	l := newState(openLibs)
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, object))
	fn, err := l.LoadString(script)
	if err == nil {
		l.Push(fn)
		err = l.PCall(0, lua.MultRet, nil)
	}
	if err != nil {
		// Argo CD shows a run-time error without the interpreter's stack trace.
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = ""
		}
		return nil, err
	}
	value := l.Get(-1)
	switch value.Type() {
	case lua.LTNil:
		return nil, nil
	case lua.LTTable:
	default:
		return nil, fmt.Errorf("expect table output from Lua script, not %s", value.Type())
	}
	encoded, err := luajson.Encode(value)
	if err != nil {
		return nil, err
	}
	result := &health{}
	if err := json.Unmarshal(encoded, result); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return &health{}, nil
		}
		return nil, err
	}
	if !healthCodes[result.Status] {
		return &health{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return result, nil
}
