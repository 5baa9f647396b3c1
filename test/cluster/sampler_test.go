package cluster

import "testing"

// TestOverlapsIn: the writer sampler's rule, without namespaces. A writer
// seen on both sides of another writer is an overlap; a handover between
// two reads, a dead process holding a stale VIP, or a demoted node is not.
func TestOverlapsIn(t *testing.T) {
	serving := nodeView{Process: true, VIP: true, Sessions: 1}
	session := nodeView{Process: true, Sessions: 1}
	demoted := nodeView{Process: true}
	deadVIP := nodeView{VIP: true} // killed, its address still on a dark link
	s := func(node string, v nodeView) writerSample { return writerSample{Node: node, nodeView: v} }
	for _, tc := range []struct {
		name string
		seq  []writerSample
		want int
	}{
		{"one writer", []writerSample{s("n1", serving), s("n2", demoted), s("n1", serving)}, 0},
		{"two writers", []writerSample{s("n1", serving), s("n2", serving), s("n1", serving)}, 1},
		{"old owner keeps a session", []writerSample{s("n1", session), s("n2", serving), s("n1", session)}, 1},
		{"handover between reads", []writerSample{s("n1", serving), s("n2", serving), s("n1", demoted)}, 0},
		{"handover the other way", []writerSample{s("n1", demoted), s("n2", serving), s("n1", serving), s("n2", demoted)}, 0},
		{"dead node with its VIP", []writerSample{s("n1", deadVIP), s("n2", serving), s("n1", deadVIP)}, 0},
		{"across rounds", []writerSample{s("n2", serving), s("n1", serving), s("n1", serving), s("n2", serving), s("n1", demoted)}, 1},
		{"reads of A between", []writerSample{s("n2", serving), s("n1", serving), s("n1", serving), s("n2", serving)}, 1},
		{"A stopped in between", []writerSample{s("n2", serving), s("n1", serving), s("n2", demoted), s("n1", serving), s("n2", serving)}, 0},
	} {
		if got := overlapsIn(tc.seq); len(got) != tc.want {
			t.Errorf("%s: %d overlaps %v, want %d", tc.name, len(got), got, tc.want)
		}
	}
}
