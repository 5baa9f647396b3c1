module github.com/hasan-storage/hasan

go 1.26.8

require (
	github.com/google/uuid v1.6.0
	github.com/spf13/cobra v1.8.1
	golang.org/x/sys v0.35.0
)

require (
	github.com/bougou/go-ipmi v0.9.1 // indirect
	github.com/gosnmp/gosnmp v1.47.0 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/spf13/pflag v1.0.5 // indirect
	github.com/stmcginnis/gofish v0.23.0 // indirect
)
